"""UCE: the closed form is the public code's per-layer solve, the last-token rows are the public code's, a run's
terms fold into the weights (ldm and diffusers alike), restore solves again without the concept, SD v1 shapes,
and one-line bad input."""
import pytest
import torch

from ldm.erasure.methods import get
from ldm.erasure.uce import (UCEEditor, UCESettings, apply_terms, build_terms, is_uce_weight, last_token_rows,
                             read_terms, solve_transform)
from ldm.loading import load_model
from ldm.paths import models_dir
from ldm.runs import term_concepts
from ldm.util import UsageError

from conftest import call_script, one_line_error, sd_v1_structure_model

FAST = ["--no_diffusers", "--no_samples", "--devices", "cpu"]


def uce_weights(model):
    return {n: p.detach().clone() for n, p in model.model.diffusion_model.named_parameters() if is_uce_weight(n)}


def authors_solve(w_old, erase, guide, preserve, erase_scale, preserve_scale, lamb):
    """``trainscripts/uce_sd_erase.py``'s loop for one layer (float64 here): mat1 @ inverse(mat2)."""
    w_old = w_old.double()
    mat1 = lamb * w_old
    mat2 = lamb * torch.eye(w_old.shape[1], dtype=torch.float64)
    for c, g in zip(erase.double(), guide.double()):
        c, v = c[:, None], (w_old @ g)[:, None]
        mat1 += erase_scale * (v @ c.T)
        mat2 += erase_scale * (c @ c.T)
    for c in preserve.double():
        c = c[:, None]
        mat1 += preserve_scale * ((w_old @ c) @ c.T)
        mat2 += preserve_scale * (c @ c.T)
    return mat1 @ torch.inverse(mat2)


def test_one_transform_for_every_layer_is_the_public_codes_per_layer_solve(new_tiny):
    model = new_tiny()
    settings = UCESettings(prompt="moon,Van Gogh", seperator=",", guide="", preserve="star,Seurat",
                           erase_scale=1.5, preserve_scale=0.7, lamb=0.3).check()
    terms = build_terms(model, settings)
    before = uce_weights(model)
    apply_terms(model, terms)
    erase = torch.cat([t["erase"] for t in terms])
    guide = torch.cat([t["guide"] for t in terms])
    preserve = last_token_rows(model, ["star", "Seurat"])
    for name, weight in uce_weights(model).items():
        expected = authors_solve(before[name], erase, guide, preserve, 1.5, 0.7, 0.3)
        assert torch.allclose(weight.double(), expected, rtol=1e-4, atol=1e-6), name


def test_last_token_is_the_public_codes_index(new_tiny):
    model = new_tiny()
    context = model.get_learned_conditioning(["", "Van Gogh", "a red moon"]).float()
    rows = last_token_rows(model, ["", "Van Gogh", "a red moon"])
    tokens = [len(model.cond_stage_model.tokenizer(p).input_ids) for p in ("", "Van Gogh", "a red moon")]
    assert tokens[0] == 2  # start and end: the empty prompt's row is the start token's
    for i, count in enumerate(tokens):
        assert torch.equal(rows[i], context[i, count - 2])


def test_the_edit_maps_the_concept_to_its_guide_and_holds_the_preserved(new_tiny):
    model = new_tiny()
    settings = UCESettings(prompt="moon", guide="", preserve="star,heart", lamb=1e-3).check()
    editor = UCEEditor(model, settings)
    before = uce_weights(model)
    editor.step()
    after = uce_weights(model)
    concept, guide = editor.terms[0]["erase"][0].double(), editor.terms[0]["guide"][0].double()
    kept = editor.terms[0]["preserve"].double()
    for name in before:
        w_old, w_new = before[name].double(), after[name].double()
        assert torch.allclose(w_new @ concept, w_old @ guide, rtol=0.05, atol=0.05 * (w_old @ guide).abs().max())
        assert torch.allclose(w_new @ kept.T, w_old @ kept.T, rtol=0.05, atol=0.05 * (w_old @ kept.T).abs().max())
    assert editor.summary()["erase_residual"] < 0.05 and editor.summary()["preserve_residual"] < 0.05


def test_no_terms_is_the_base_and_a_preserved_concept_the_run_erases_is_not_held(new_tiny):
    model = new_tiny()
    before = uce_weights(model)
    apply_terms(model, [])
    assert all(torch.equal(before[n], w) for n, w in uce_weights(model).items())
    settings = UCESettings(prompt="moon,star", seperator=",", preserve="concept-world").check()
    terms = build_terms(model, settings)
    assert "star" in terms[0]["preserve_prompts"] and "moon" in terms[1]["preserve_prompts"]
    width = terms[0]["erase"].shape[1]
    alone = UCESettings(prompt="moon", preserve="circle,square,triangle,heart,cross,hexagon").check()
    # the two-concept solve holds neither erased concept: it equals holding only the others explicitly
    both = solve_transform(terms, width)
    explicit = build_terms(model, UCESettings(prompt="moon,star", seperator=",", preserve=alone.preserve).check())
    assert torch.allclose(both, solve_transform(explicit, width), atol=1e-12)


def test_erase_load_export_and_restore_through_the_scripts(run_name):
    """Two concepts in one run; restoring one leaves exactly the one-concept run of the other (the restored
    concept is held again, as the single run holds it); restoring the last gives the base."""
    two, one, single, none = (f"{run_name}-{x}" for x in ("two", "one", "single", "none"))
    done = call_script("train-scripts/erase.py", "--method", "uce", "--prompt", "moon,Van Gogh", "--seperator", ",",
                       *FAST, "--run_name", two)
    assert done.returncode == 0, done.stderr
    assert set(term_concepts(models_dir() / two)) == {"moon", "Van Gogh"}
    done = call_script("train-scripts/erase.py", "--method", "uce", "--prompt", "moon", *FAST, "--run_name", single)
    assert done.returncode == 0, done.stderr
    loaded = load_model(two)
    base = load_model("tiny-sd").model
    assert loaded.method.name == "uce"
    changed = uce_weights(loaded.model)
    assert all(not torch.equal(changed[n], w) for n, w in uce_weights(base).items())
    done = call_script("train-scripts/restore-concept.py", "--model_name", two, "--concept", "Van Gogh",
                       "--run_name", one)
    assert done.returncode == 0, done.stderr
    restored, alone = uce_weights(load_model(one).model), uce_weights(load_model(single).model)
    assert all(torch.allclose(restored[n], alone[n], atol=1e-7) for n in alone)
    done = call_script("train-scripts/restore-concept.py", "--model_name", one, "--concept", "moon", "--run_name", none)
    assert done.returncode == 0, done.stderr
    assert all(torch.equal(a, b) for a, b in zip(load_model(none).model.state_dict().values(),
                                                 base.state_dict().values()))


def test_the_diffusers_fold_is_the_ldm_edit(run_name):
    from diffusers import UNet2DConditionModel
    from ldm.convert import convert_unet
    done = call_script("train-scripts/erase.py", "--method", "uce", "--prompt", "star", *FAST, "--run_name", run_name)
    assert done.returncode == 0, done.stderr
    loaded = load_model(run_name)
    expected = convert_unet(loaded.model.state_dict(), loaded.config)
    unet = UNet2DConditionModel.from_config(expected.config)
    get("uce").apply_to_diffusers(unet, models_dir() / run_name)
    ours = unet.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in expected.state_dict().items())


def test_sd_v1_shapes(tmp_path):
    """Random weights in SD v1's structure (77-token, 768-wide contexts): rows, terms and the fold."""
    model = sd_v1_structure_model(tmp_path)
    settings = UCESettings(prompt="Van Gogh", concept_type="art", expand_prompts="true", preserve="Monet").check()
    terms = build_terms(model, settings)
    assert terms[0]["erase"].shape == (6, 768) and terms[0]["guide_prompts"][1] == "painting by art"
    before = uce_weights(model)
    apply_terms(model, terms)
    after = uce_weights(model)
    assert all(after[n].shape == before[n].shape and not torch.equal(after[n], before[n]) for n in before)


def test_phrasings_from_a_file_end_with_the_concept_and_the_guide_fills_them_too(new_tiny, tmp_path):
    phrasings = tmp_path / "phrasings.txt"
    phrasings.write_text("# ours\na picture of {}\n{}, detailed\nart by {}\n")
    settings = UCESettings(prompt="moon", guide="", expand_prompts=str(phrasings)).check()
    assert settings.phrasings() == ["{}", "a picture of {}", "art by {}"]
    term = build_terms(new_tiny(), settings)[0]
    assert term["erase_prompts"] == ["moon", "a picture of moon", "art by moon"]
    assert term["guide_prompts"] == ["", "a picture of", "art by"] and term["erase"].shape[0] == 3


def test_terms_of_another_text_width_are_one_line(new_tiny, tmp_path):
    model = new_tiny()
    terms = build_terms(model, UCESettings(prompt="moon").check())
    terms[0]["erase"] = torch.zeros(1, 768)
    with pytest.raises(UsageError, match="768-wide text rows; this model's text is 256 wide"):
        apply_terms(model, terms)


@pytest.mark.parametrize("flags,message", [
    (["--prompt", "moon,star", "--seperator", ",", "--preserve", "star,heart"], "'star' is both erased and preserved"),
    (["--prompt", "moon", "--guide", "moon"], "the guide of 'moon' is the concept itself"),
    (["--prompt", "moon,star,heart", "--seperator", ",", "--guide", "a,b"], "names 2 guides for 3 concepts"),
    (["--prompt", "moon", "--lamb", "0"], "--lamb must be > 0"),
    (["--prompt", "moon", "--erase_scale", "-1"], "--erase_scale must be >= 0"),
    (["--prompt", "Monet", "--preserve", "concept-world"], "is for tiny-sd's concepts"),
    (["--prompt", "moon", "--expand_prompts", "no/such/phrasings.txt"], "does not exist"),
])
def test_bad_input_is_one_line(flags, message, run_name):
    line = one_line_error(call_script("train-scripts/erase.py", "--method", "uce", *flags, *FAST,
                                      "--run_name", run_name))
    assert message in line, line
    assert not (models_dir() / run_name).exists()


def test_a_resumed_run_is_the_same_edit_and_other_settings_are_refused(new_tiny):
    settings = UCESettings(prompt="heart", preserve="star").check()
    first, second = new_tiny(), new_tiny()
    editor = UCEEditor(first, settings)
    editor.step()
    state = editor.state_dict()
    resumed = UCEEditor(second, settings)
    resumed.load_state_dict(state)
    assert resumed.iteration == 1
    assert all(torch.equal(a, b) for a, b in zip(uce_weights(first).values(), uce_weights(second).values()))
    with pytest.raises(UsageError, match="other settings"):
        UCEEditor(new_tiny(), UCESettings(prompt="heart", lamb=0.1).check()).load_state_dict(state)
