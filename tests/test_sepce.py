"""CiE and SepCE: the loss and stop rule, exact preservation of protected prompts (tiny-sd and SD v1's
77 x 768 contexts), separable terms, iterative erasure, restore, resume, and one-line bad input."""
import copy
import json

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.erasure import methods
from ldm.erasure.cie import CiESettings, CiETrainer, MomentumStop, concept_irrelevance
from ldm.erasure.concept_data import encode_images, read_images
from ldm.erasure.sepce import (MIN_NULL_DIMS, SepCESettings, SepCETrainer, apply_terms, default_keep, protected_set,
                               read_terms, term_basis, weight_delta)
from ldm.erasure.settings import resolve
from ldm.loading import load_model, load_run
from ldm.paths import models_dir
from ldm.runs import TRAINED_PARAMS, restore_concept, term_files
from ldm.text_geometry import stacked_embeddings
from ldm.util import UsageError

from conftest import TINY, call_script, one_line_error, sd_v1_structure_model


def cross_attention_outputs(model, prompts):
    """Every attn2 to_k/to_v output for the prompts' contexts: {weight name: (B, tokens, d_out)}."""
    context = model.get_learned_conditioning(list(prompts)).float()
    return {n: context @ w.T for n, w in model.model.diffusion_model.named_parameters()
            if "attn2.to_k.weight" in n or "attn2.to_v.weight" in n}


def random_term(model, concept, protected, scale=1.0, seed=0):
    """A term with random (not trained) alphas: the projection, not training, is what preserves."""
    basis = term_basis(model, protected).float()
    generator = torch.Generator().manual_seed(seed)
    alphas = {n: torch.randn(w.shape[0], basis.shape[1], generator=generator) * scale
              for n, w in model.model.diffusion_model.named_parameters()
              if "attn2.to_k.weight" in n or "attn2.to_v.weight" in n}
    return {"concept": concept, "protected": protected, "beta": 1.0, "basis": basis, "alphas": alphas, "path": "-"}


def preservation(model, term, protected, concept):
    """(max abs change of protected prompts' keys/values, smallest relative change for the concept)."""
    before_p, before_c = cross_attention_outputs(model, protected), cross_attention_outputs(model, [concept])
    apply_terms(model, [term])
    after_p, after_c = cross_attention_outputs(model, protected), cross_attention_outputs(model, [concept])
    kept = max((after_p[n] - before_p[n]).abs().max().item() for n in before_p)
    moved = min(((after_c[n] - before_c[n]).norm() / before_c[n].norm()).item() for n in before_c)
    return kept, moved


def test_protected_keys_and_values_are_exact_on_tiny_sd(tiny):
    protected = ["", *default_keep("Van Gogh")]
    term = random_term(tiny, "Van Gogh", protected)
    assert term["basis"].shape[0] == 256 and term["basis"].shape[1] >= 100
    kept, moved = preservation(tiny, term, protected, "Van Gogh")
    assert kept < 1e-4 and moved > 0.05, (kept, moved)


def test_protected_keys_and_values_are_exact_in_sd_v1_structure(tmp_path):
    """SD v1's structure (16 cross-attention layers) with a 768-wide, 77-token text encoder, random weights."""
    model = sd_v1_structure_model(tmp_path)
    context = model.get_learned_conditioning(["a"])
    assert tuple(context.shape[1:]) == (77, 768)
    protected = ["", "Picasso", "Monet", "a photo of a dog"]
    term = random_term(model, "Van Gogh", protected, scale=0.1)
    assert sum("attn2.to_k" in n for n in term["alphas"]) == 16
    kept, moved = preservation(model, term, protected, "Van Gogh")
    assert kept < 1e-4 and moved > 0.01, (kept, moved)


def test_basis_annihilates_the_protected_embeddings_and_too_small_a_null_space_is_refused(tiny):
    protected = ["", "circle", "square"]
    basis = term_basis(tiny, protected).float()
    embeddings = stacked_embeddings(tiny, protected)
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5)
    assert (embeddings @ basis).abs().max() < 1e-4 * embeddings.abs().max()
    many = [f"a {c} {o}" for c in ("red", "blue", "green", "pink", "cyan") for o in ("circle", "star", "moon", "heart")]
    with pytest.raises(UsageError, match=f"< {MIN_NULL_DIMS}"):
        term_basis(tiny, ["", *many])


def test_sepce_settings_refuse_bad_sets(tiny):
    with pytest.raises(UsageError, match="own keep set"):
        SepCESettings(prompt="Van Gogh", keep="Seurat, Van Gogh").check()
    with pytest.raises(UsageError, match="keep set is empty"):
        SepCESettings(prompt="Van Gogh", keep=" , ").check()
    assert SepCESettings(prompt="Van Gogh", keep="Seurat, a photo").keep_set() == ["Seurat", "a photo"]
    assert SepCESettings(prompt="Van Gogh").keep_set() == default_keep("Van Gogh")
    earlier = [{"concept": "Van Gogh", "protected": ["", "Seurat"]}]  # a run given to --on erased it already
    with pytest.raises(UsageError, match="already erased"):
        SepCETrainer(tiny, SepCESettings(prompt="Van Gogh", keep="Seurat"), training_latents(tiny), ["", "Seurat"],
                     term_basis(tiny, ["", "Seurat"]), earlier)
    with pytest.raises(UsageError, match="no default keep set"):
        default_keep("a photo of a dog")
    assert protected_set(["b"], [{"concept": "a", "protected": ["", "b", "c"]}]) == ["", "b", "a", "c"]
    # erasing a concept an earlier term protected: the new term's basis must not annihilate it
    assert protected_set(["b"], [{"concept": "a", "protected": ["", "b", "c"]}], concept="c") == ["", "b", "a"]


def test_momentum_stop_rule_and_loss():
    rule = MomentumStop(tau=0.5, warmup=3, start="zero")
    stops = [rule.update(x) for x in (1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)]
    # m: 0.1, 0.19, 0.271 (warm-up) ... below 0.5 at once after it
    assert stops == [False, False, False, True, True, True, True] and rule.stop_iteration == 4
    rule = MomentumStop(tau=0.01, warmup=0, start="zero")
    assert not rule.update(1.0) and rule.m == pytest.approx(0.1)
    r = torch.tensor([1.0, -2.0])
    assert concept_irrelevance(r, r) == pytest.approx(2.5) and concept_irrelevance(r, torch.zeros(2)) == 0


def training_latents(model, n=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, 4, model.image_size, model.image_size), generator=generator)


def cie_settings(**changes):
    return CiESettings(**{"prompt": "Van Gogh", "iterations": 5, "lr": 1e-3, "l1_weight": 1e-5,
                          "tau": 0.0, "warmup": 2, "batch_size": 2, **changes})


def test_cie_trains_attn2_only_zeroes_gradients_and_resumes_exactly(tiny, new_tiny):
    trainer = CiETrainer(tiny, cie_settings(gradients="zero"), training_latents(tiny))
    assert trainer.trained_names and all("attn2" in n for n in trainer.trained_names)
    trainer.step()
    first = {n: p.grad.clone() for n, p in trainer.params.items()}
    trainer.step()
    # zeroed every step: the second gradient is that iteration's own, not a sum with the first
    assert any(not torch.allclose(p.grad, first[n]) for n, p in trainer.params.items())
    state = copy.deepcopy(trainer.state_dict())  # the live tensors, as written to disk at that point
    trainer.step()
    resumed = CiETrainer(new_tiny(), cie_settings(gradients="zero"), training_latents(tiny))
    resumed.load_state_dict(state)
    resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(trainer.params.values(), resumed.params.values()))
    assert resumed.rule.seen == 3 and resumed.direction_losses == trainer.direction_losses


def test_sepce_trains_only_alphas_and_keeps_protected_predictions(tiny):
    keep = default_keep("Van Gogh")
    settings = SepCESettings(prompt="Van Gogh", keep=",".join(keep), iterations=3, lr=1e-2, tau=0.0, batch_size=2)
    protected = protected_set(keep)
    unet_before = {k: v.clone() for k, v in tiny.model.diffusion_model.state_dict().items()}
    trainer = SepCETrainer(tiny, settings, training_latents(tiny), protected, term_basis(tiny, protected))
    for _ in range(3):
        trainer.step()
    unet_after = tiny.model.diffusion_model.state_dict()
    assert all(torch.equal(v, unet_after[k]) for k, v in unet_before.items())
    assert any(a.abs().max() > 0 for a in trainer.params.values())
    x, t = training_latents(tiny, 1, seed=5), torch.tensor([500])
    contexts = tiny.get_learned_conditioning(["", "Seurat", "Van Gogh"])
    with torch.no_grad():
        for i, prompt in enumerate(["", "Seurat", "Van Gogh"]):
            edited, frozen = trainer.student(x, t, contexts[i:i + 1]), trainer.frozen(x, t, contexts[i:i + 1])
            difference = (edited - frozen).abs().max().item()
            assert (difference < 1e-4) if prompt != "Van Gogh" else (difference > 1e-4), (prompt, difference)


def test_terms_compose_restore_and_all_dropped_is_the_base(tiny, tiny_state, tmp_path):
    """Two terms in a run folder: loading adds both; restoring one leaves the other; none is the base."""
    from ldm.runs import base_identity, save_term, write_run_config
    run = tmp_path / "ab"
    run.mkdir()
    write_run_config(run, OmegaConf.load(TINY / "config.yaml"), {"method": "sepce"},
                     base_identity(TINY / "config.yaml", TINY / "model.ckpt"))
    terms = [random_term(tiny, "Van Gogh", ["", "Seurat"], scale=0.01, seed=1),
             random_term(tiny, "heart", ["", "circle"], scale=0.01, seed=2)]
    for term in terms:
        save_term(run, term["concept"], {"basis": term["basis"], **{f"alpha.{n}": a for n, a in term["alphas"].items()}},
                  {"method": "sepce", "beta": 1.0, "protected": json.dumps(term["protected"])})
    assert [t["concept"] for t in read_terms(run)] == ["heart", "Van Gogh"]
    loaded = load_run(run).model.model.diffusion_model.state_dict()
    name = next(iter(terms[0]["alphas"]))
    expected = tiny_state[f"model.diffusion_model.{name}"].double() + sum(
        weight_delta(t["alphas"][name].double(), t["basis"].double(), 1.0) for t in terms)
    assert torch.allclose(loaded[name].double(), expected, atol=1e-6)

    only_heart = restore_concept(run, "Van Gogh", "b", root=tmp_path)
    assert [t["concept"] for t in read_terms(only_heart)] == ["heart"]
    assert load_file(term_files(only_heart)[0]).keys() == load_file(term_files(run)[0]).keys()
    none = restore_concept(only_heart, "heart", "none", root=tmp_path)
    assert term_files(none) == [] and OmegaConf.load(none / "config.yaml").run.restored == ["Van Gogh", "heart"]
    base = load_run(none).model.state_dict()
    assert all(torch.equal(base[k], v) for k, v in tiny_state.items())
    with pytest.raises(UsageError, match="not erased by run"):
        restore_concept(run, "Seurat", "c", root=tmp_path)


def test_images_of_a_folder_encode_to_latents(tiny, tmp_path):
    from PIL import Image
    import numpy as np
    side = tiny.image_size * 2 ** tiny.num_downs
    for i in range(2):
        Image.fromarray(np.full((side, side, 3), 40 * i, np.uint8)).save(tmp_path / f"0_{i}.png")
    latents = encode_images(tiny, read_images(tmp_path))
    assert latents.shape == (2, tiny.channels, tiny.image_size, tiny.image_size)
    Image.fromarray(np.zeros((side * 2, side * 2, 3), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(UsageError, match="different sizes"):
        read_images(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no images"):
        read_images(tmp_path / "empty")


FAST = ["--iterations", 3, "--num_images", 2, "--batch_size", 1, "--devices", "cpu", "--no_diffusers", "--no_samples"]


@pytest.mark.slow  # an end-to-end run of the scripts: the slow tier
def test_scripts_erase_iteratively_restore_and_load(run_name, tmp_path):
    """train-sepce.py twice (--on), restore-concept.py, then every run loads through load_model; preservation.py
    on the restored run; CiE too."""
    a, ab, b, c, cie = (f"{run_name}-{x}" for x in ("a", "ab", "b", "c", "cie"))
    with_diffusers = [f for f in FAST if f != "--no_diffusers"]
    done = call_script("train-scripts/train-sepce.py", "--prompt", "Van Gogh", *with_diffusers, "--run_name", a)
    assert done.returncode == 0, done.stderr
    a_dir = models_dir() / a
    assert "null space" in done.stdout and json.loads((a_dir / "training.json").read_text())["null_space_dims"] >= 100
    # the diffusers folder holds the terms folded into to_k/to_v, as loading the run does
    loaded = load_model(a)
    assert loaded.method.name == "sepce" and loaded.config.run.method == "sepce"
    folded = loaded.model.model.diffusion_model.state_dict()
    converted = [v for k, v in load_file(a_dir / "diffusers/unet/diffusion_pytorch_model.safetensors").items()
                 if "attn2.to_k.weight" in k]
    edited = [v for k, v in folded.items() if "attn2.to_k.weight" in k]
    assert len(converted) == len(edited) and all(any(torch.equal(w, c) for c in converted) for w in edited)
    done = call_script("train-scripts/train-sepce.py", "--prompt", "Seurat", *FAST, "--on", a, "--run_name", ab)
    assert done.returncode == 0, done.stderr
    assert [t["concept"] for t in read_terms(models_dir() / ab)] == ["Seurat", "Van Gogh"]
    seurat = read_terms(models_dir() / ab)[0]
    assert "Van Gogh" in seurat["protected"] and "Seurat" not in seurat["protected"]  # built against A, not itself
    assert any(alpha.abs().max() > 0 for alpha in seurat["alphas"].values())
    assert load_file(a_dir / "term-van-gogh.safetensors").keys() == \
        load_file(models_dir() / ab / "term-van-gogh.safetensors").keys()
    again = call_script("train-scripts/train-sepce.py", "--prompt", "Van Gogh", *FAST, "--on", ab, "--run_name", c)
    errors = [line for line in again.stderr.splitlines() if line.startswith("error: ")]
    assert again.returncode == 2 and len(errors) == 1 and "already erased" in errors[0], again.stderr
    done = call_script("train-scripts/restore-concept.py", "--model_name", ab, "--concept", "Van Gogh", "--run_name", b)
    assert done.returncode == 0, done.stderr
    assert [t["concept"] for t in read_terms(models_dir() / b)] == ["Seurat"]
    assert load_model(b).identity["sha256"] != load_model(ab).identity["sha256"]
    line = one_line_error(call_script("train-scripts/restore-concept.py", "--model_name", ab, "--concept", "Pollock",
                                      "--run_name", c))
    assert "not erased by run" in line and "'Seurat'" in line and not (models_dir() / c).exists()
    for steps in (2, 3):  # another setting writes another file: an earlier table is never replaced
        done = call_script("eval-scripts/preservation.py", "--model_name", b, "--num_seeds", 1, "--ddim_steps", steps,
                           "--save_path", tmp_path)
        assert done.returncode == 0, done.stderr
    tables = [pd.read_csv(p, keep_default_na=False) for p in sorted((tmp_path / b).glob("*.csv"))]
    assert len(tables) == 2 and all(set(t["prompt"]) == {"", *read_terms(models_dir() / b)[0]["protected"]} and
                                    (t["edited_sha256"] == load_model(b).sha256[:12]).all() and
                                    (t["pixel_max_abs_diff"] <= 1).all() for t in tables)
    done = call_script("train-scripts/train-cie.py", "--prompt", "heart", *FAST, "--run_name", cie)
    assert done.returncode == 0, done.stderr
    assert (models_dir() / cie / TRAINED_PARAMS).is_file()
    loaded = load_model(cie)
    assert loaded.method.name == "cie" and loaded.config.run.iterations == 3
    line = one_line_error(call_script("train-scripts/restore-concept.py", "--model_name", cie, "--concept", "heart",
                                      "--run_name", c))
    assert "is a cie run" in line and "sepce" in line


def test_a_concept_the_on_run_erased_is_refused_before_any_image(run_name, tiny):
    """--on a run that erased 'Hokusai': erasing 'Hokusai' again is one line, before an image is drawn."""
    from ldm.runs import base_identity, save_term, write_run_config
    earlier = models_dir() / f"{run_name}-on"
    earlier.mkdir()
    write_run_config(earlier, OmegaConf.load(TINY / "config.yaml"), {"method": "sepce"},
                     base_identity(TINY / "config.yaml", TINY / "model.ckpt"))
    term = random_term(tiny, "Hokusai", ["", "Seurat"], scale=0.01)
    save_term(earlier, "Hokusai", {"basis": term["basis"], **{f"alpha.{n}": a for n, a in term["alphas"].items()}},
              {"method": "sepce", "beta": 1.0, "protected": json.dumps(term["protected"])})
    again = call_script("train-scripts/train-sepce.py", "--prompt", "Hokusai", *FAST, "--num_images", 1,
                        "--on", earlier.name, "--run_name", run_name)
    assert "already erased" in one_line_error(again)


@pytest.mark.parametrize("script,flags,message", [
    ("train-sepce.py", ["--prompt", "Van Gogh", "--keep", "Seurat,Van Gogh"], "own keep set"),
    ("train-sepce.py", ["--prompt", "Van Gogh", "--keep", " , "], "keep set is empty"),
    ("train-sepce.py", ["--prompt", "a dog"], "no default keep set"),
    ("train-sepce.py", ["--prompt", "Van Gogh", "--on", "no-such-run"], "no such run"),
    ("train-sepce.py", ["--prompt", "heart", "--keep", ",".join(  # refused before any image is drawn
        f"a {c} {o}" for c in ("red", "blue", "green", "pink") for o in ("circle", "star", "moon", "heart", "cross"))],
        "too many protected concepts"),
    ("train-cie.py", ["--prompt", "heart", "--data_dir", "no/such/folder"], "not a folder"),
    ("restore-concept.py", ["--model_name", "no-such-run", "--concept", "x", "--run_name", "y"], "no such run"),
    ("restore-concept.py", ["--model_name", "tiny-sd", "--concept", "x", "--run_name", "y"], "no such run"),
])
def test_bad_input_is_one_line(script, flags, message, run_name):
    if "--run_name" not in flags and script != "restore-concept.py":
        flags = [*flags, "--run_name", run_name, "--num_images", 2, "--devices", "cpu"]
    line = one_line_error(call_script(f"train-scripts/{script}", *flags))
    assert message in line, line
    assert not (models_dir() / run_name).exists() and not (models_dir() / "y").exists()


def test_preservation_table_measures_keys_values_and_pixels(tiny, new_tiny):
    from ldm.erasure.report import preservation_table
    base = new_tiny()
    protected = ["", "Seurat"]
    apply_terms(tiny, [random_term(tiny, "Van Gogh", protected, scale=0.05)])
    table = preservation_table(base.eval(), tiny, ["", "Seurat", "Van Gogh"], seeds=[0, 1], ddim_steps=3).set_index("prompt")
    assert (table.loc[["", "Seurat"], "key_value_max_abs_diff"] < 1e-4).all()
    assert (table.loc[["", "Seurat"], "pixel_max_abs_diff"] <= 1).all() and table.loc["Van Gogh", "key_value_max_abs_diff"] > 1e-2
    assert (table["images"] == 2).all()


def test_prompt_templates_condition_the_loss_on_phrasings(tiny, tmp_path):
    from ldm.erasure.cie import ConceptDirectionLoss, concept_phrasings
    assert concept_phrasings("moon") == ["moon"]
    assert concept_phrasings("moon", ["{}", "a photo of {}"]) == ["moon", "a photo of moon"]
    with pytest.raises(UsageError, match="exactly once"):
        (tmp_path / "no-slot.txt").write_text("{}\na picture of the concept\n")
        cie_settings(prompt_templates=str(tmp_path / "no-slot.txt")).check()
    loss = ConceptDirectionLoss(tiny, concept_phrasings("moon", ["{}", "a photo of {}"]), training_latents(tiny), "cpu")
    seen = []

    def recording(x, t, context):
        seen.append(context[: len(x) // 2].clone())
        return torch.zeros_like(x)

    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        loss(recording, recording, generator, batch_size=4)
    used = {int(torch.isclose(c, loss.concepts[1]).all()) for batch in seen for c in batch}
    assert used == {0, 1}  # both phrasings drawn


def test_prompt_templates_flag_and_model_defaults(tmp_path, monkeypatch):
    """--prompt_templates: 'none' is the bare concept, a config's relative path is read from the repository
    root wherever the script runs, a missing file is a one-line error; tiny-sd's defaults name a file."""
    from ldm.erasure.cie import templates_of
    from ldm.util import load_config
    assert templates_of(None) is None and templates_of("none") is None and templates_of(" None ") is None
    monkeypatch.chdir(tmp_path)
    config = load_config(str(TINY / "config.yaml"))
    for name in ("cie", "sepce"):
        method = methods.get(name)
        settings, sources = resolve(method.settings, {"prompt": "heart"}, config, method.config_blocks)
        assert sources["prompt_templates"] == f"model config {name}_defaults"
        templates = templates_of(settings.prompt_templates)
        assert templates[0] == "{}" and len(templates) > 5 and all(t.count("{}") == 1 for t in templates)
        flagged, sources = resolve(method.settings, {"prompt": "heart", "prompt_templates": "none"}, config,
                                   method.config_blocks)
        assert flagged.prompt_templates == "none" and sources["prompt_templates"] == "flag"
        assert templates_of(flagged.prompt_templates) is None
    with pytest.raises(UsageError, match="does not exist"):
        templates_of("no/such/templates.txt")


def test_direction_by_timestep_compares_edited_and_frozen_directions(tiny, new_tiny):
    """The unedited model's direction is the frozen one (cosine 1, nothing moved); a SepCE term moves the
    conditional prediction and never the unconditional one."""
    from ldm.erasure.cie import direction_by_timestep
    latents = training_latents(tiny)[:2]
    same = direction_by_timestep(tiny, tiny, latents, "Van Gogh", timesteps=(900, 100))
    assert (same.cosine > 0.9999).all() and (same.conditional_moved == 0).all() and len(same) == 2
    edited = new_tiny()
    apply_terms(edited, [random_term(edited, "Van Gogh", ["", "Seurat"], scale=0.5)])
    table = direction_by_timestep(tiny, edited, latents, "Van Gogh", timesteps=(900,))
    assert table.conditional_moved[0] > 1e-3 and table.unconditional_moved[0] < 1e-3 * table.conditional_moved[0]
