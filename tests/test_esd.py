"""ESD: parameter selection, the target, the one-UNet teacher, trajectory reuse, resume and bad input,
on the real tiny-sd model (and SD v1's UNet on the meta device for the layer names)."""
import copy
import math
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from ldm.erasure import methods
from ldm.erasure.esd import (DEFAULT_PROMPT_TEMPLATES, TRAIN_METHODS, ESDSettings, ESDTrainer, concept_words,
                             ddpm_timestep_interval, esd_target, read_prompt_templates, run_name, select_parameters,
                             steps_to_reach)
from ldm.erasure.settings import resolve
from ldm.erasure.trainer import NonFiniteLoss
from ldm.loading import load_model
from ldm.paths import REPO_ROOT, models_dir
from ldm.runs import TRAINED_PARAMS
from ldm.util import UsageError, atomic_save, instantiate_from_config, load_config, load_model_from_config

from conftest import SD_CONFIG, TINY, call_script, one_line_error, run_script

@pytest.fixture(scope="module")
def sd_unet():
    config = OmegaConf.load(SD_CONFIG)
    with torch.device("meta"):
        return instantiate_from_config(config.model.params.unet_config)


def settings(**kw):
    return ESDSettings(**{"prompt": "circle", "lr": 1e-3, "ddim_steps": 8, "image_size": 64, "iterations": 6, **kw})


def test_parameter_selection_follows_the_original_rules(sd_unet):
    names = [n for n, _ in sd_unet.named_parameters()]
    chosen = {m: set(select_parameters(sd_unet, m)) for m in TRAIN_METHODS}
    assert chosen["xattn"] == {n for n in names if "attn2" in n} and len(chosen["xattn"]) == 16 * 5  # 16 layers: to_q, to_k, to_v, to_out.0 (w, b)
    assert not any("attn2" in n or "time_embed" in n or n.startswith("out.") for n in chosen["noxattn"])
    assert chosen["noxattn"] | chosen["xattn"] | {n for n in names if "time_embed" in n or n.startswith("out.")} == set(names)
    assert chosen["selfattn"] == {n for n in names if "attn1" in n}
    assert chosen["full"] == set(names)
    assert chosen["notime"] == {n for n in names if "time_embed" not in n and not n.startswith("out.")}
    assert {n.split(".")[1] for n in chosen["xlayer"]} == {"6", "8"} and all("attn2" in n for n in chosen["xlayer"])
    assert {n.split(".")[1] for n in chosen["selflayer"]} == {"4", "7"} and all("attn1" in n for n in chosen["selflayer"])
    assert chosen["xattn-strict"] == {n for n in names if ".attn2.to_k." in n or ".attn2.to_v." in n}
    # every ESD variant of the registry is named by its train method and by its own name (esd-x-strict, ...)
    variants = [m for m in methods.REGISTRY if m.family == "esd"]
    assert {m.fixed["train_method"] for m in variants} == set(TRAIN_METHODS)
    for method in variants:
        assert methods.esd_variant(method.name) is method is methods.esd_variant(method.fixed["train_method"])
    assert methods.esd_variant("esd-x-strict").fixed["train_method"] == "xattn-strict"


def test_unknown_or_empty_selection_is_a_clear_error(tiny):
    with pytest.raises(UsageError, match="unknown; use one of: xattn, noxattn"):
        methods.esd_variant("cross-attention")
    with pytest.raises(UsageError, match="unknown; use one of: xattn, noxattn"):
        select_parameters(tiny.model.diffusion_model, "cross-attention")
    with pytest.raises(UsageError, match="selects no parameters"):
        select_parameters(tiny.model.diffusion_model, "xlayer")  # tiny-sd has no output_blocks.6


def test_prompt_words_run_name_and_timestep_interval():
    assert concept_words("Van Gogh") == ["Van Gogh"]
    assert concept_words("circle, Van Gogh ,", ",") == ["circle", "Van Gogh"]
    assert len(concept_words("allartist", ",")) == 6 and "nudity" in concept_words("i2p", ",")
    with pytest.raises(UsageError, match="empty"):
        concept_words("  ")
    assert run_name(ESDSettings(prompt="Van Gogh")) == "compvis-word_VanGogh-method_xattn-sg_3-ng_1-iter_1000-lr_1e-05"
    assert run_name(ESDSettings(prompt="moon", train_method="noxattn", negative_guidance=2.5, iterations=5, lr=1e-3)) \
        == "compvis-word_moon-method_noxattn-sg_3-ng_2.5-iter_5-lr_0.001"
    assert ddpm_timestep_interval(0, 50) == (0, 20) and ddpm_timestep_interval(49, 50) == (980, 1000)


@pytest.mark.parametrize("ddim_steps", [50, 20, 7])
def test_x_t_sits_inside_its_loss_timestep_interval(ddim_steps):
    """After ``steps_to_reach(t_enc)`` DDIM steps from x_T, the sampler stands at DDIM timestep
    ``timesteps[S - 1 - steps]``: that noise level must lie in the loss's interval for t_enc."""
    from ldm.models.diffusion.ddim import make_ddim_timesteps
    timesteps = make_ddim_timesteps(ddim_steps)
    for t_enc in range(ddim_steps):
        lo, hi = ddpm_timestep_interval(t_enc, ddim_steps)
        assert lo <= timesteps[ddim_steps - 1 - steps_to_reach(t_enc, ddim_steps)] < hi, t_enc


def test_prompt_templates_train_every_phrasing_of_every_word(tiny, tmp_path):
    templates = read_prompt_templates(DEFAULT_PROMPT_TEMPLATES)
    assert "{}" in templates and len(templates) >= 8
    evaluation = " ".join(p.read_text() for p in (REPO_ROOT / "data/tiny-sd").rglob("*.csv"))
    assert not [t for t in templates if t != "{}" and t.replace("{}", "").strip(" ,") in evaluation]
    (tmp_path / "two.txt").write_text("{}\na picture of {}\n")
    chosen = settings(prompt="circle, star", seperator=",", prompt_templates=str(tmp_path / "two.txt"))
    assert chosen.phrasings() == ["circle", "a picture of circle", "star", "a picture of star"]
    trainer = ESDTrainer(tiny, chosen)
    expected = tiny.get_learned_conditioning(chosen.phrasings())
    assert torch.allclose(trainer.concepts, expected)
    drawn = {int((trainer.concepts == trainer._draw_concept_and_noise()[0]).all(dim=(1, 2)).nonzero()) for _ in range(40)}
    assert drawn == {0, 1, 2, 3}
    for index, (bad, message) in enumerate((("a picture", "exactly once"), ("{} and {}", "exactly once"),
                                            ("# only a comment", "no templates"))):
        (tmp_path / f"bad{index}.txt").write_text(bad + "\n")
        with pytest.raises(UsageError, match=message):
            settings(prompt_templates=str(tmp_path / f"bad{index}.txt")).check()
    with pytest.raises(UsageError, match="cannot be combined"):
        settings(prompt_templates=str(tmp_path / "two.txt"), erase_from="star").check()
    (tmp_path / "t.txt").write_text("# comment\n\na photo of {}\n")
    assert read_prompt_templates(tmp_path / "t.txt") == ["a photo of {}"]
    with pytest.raises(UsageError, match="does not exist"):
        read_prompt_templates(tmp_path / "missing.txt")


def esd_resolve(flags, model_config, train_method="xattn"):
    """ESD's settings as erase.py resolves them: flag > the model config's esd_defaults > the paper."""
    return resolve(ESDSettings, {"prompt": "circle", **flags}, model_config, ("esd_defaults",),
                   {"train_method": train_method})[0]


def test_model_defaults_fill_only_what_the_user_left_and_reuse_follows_the_users_sampling():
    tiny = load_config(TINY / "config.yaml")
    paper = esd_resolve({}, OmegaConf.create({}))
    assert {k: getattr(paper, k) for k in ("iterations", "lr", "start_guidance", "negative_guidance", "ddim_steps",
                                           "sample_from", "targets_per_trajectory")} == {
        "iterations": 1000, "lr": 1e-5, "start_guidance": 3.0, "negative_guidance": 1.0, "ddim_steps": 50,
        "sample_from": "esd", "targets_per_trajectory": 1}
    filled = esd_resolve({"lr": 5e-4}, tiny)
    assert filled.lr == 5e-4 and filled.iterations == tiny.esd_defaults.iterations
    assert filled.targets_per_trajectory == tiny.esd_defaults.get("targets_per_trajectory", 1)
    reuse = OmegaConf.create({"esd_defaults": {"sample_from": "base", "targets_per_trajectory": 20}})
    assert esd_resolve({"sample_from": "esd"}, reuse).targets_per_trajectory == 1  # the original's sampling
    assert esd_resolve({"ddim_steps": 6}, reuse).targets_per_trajectory == 6  # at most one per step
    with pytest.raises(UsageError, match="must be <= --ddim_steps"):  # the user's own contradictory choice
        esd_resolve({"targets_per_trajectory": 30, "ddim_steps": 6}, reuse)


def test_target_is_negatively_guided():
    e0, ep = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    assert torch.allclose(esd_target(e0, e0, ep, 2.0), e0 - 2.0 * (ep - e0))


def test_one_unet_teacher_equals_a_frozen_copy_after_training(tiny):
    frozen = copy.deepcopy(tiny.model.diffusion_model)
    trainer = ESDTrainer(tiny, settings())
    before = {n: p.clone() for n, p in tiny.model.diffusion_model.named_parameters()}
    for _ in range(3):
        assert torch.isfinite(torch.tensor(trainer.step()))
    after = dict(tiny.model.diffusion_model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= set(trainer.trained_names)  # only cross-attention moved
    # the teacher keeps only the trained subset: one model plus the cross-attention weights
    assert sum(v.numel() for v in trainer.teacher.original.values()) == sum(p.numel() for p in trainer.params.values())
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 16, 256)
    with torch.no_grad():
        assert torch.allclose(trainer.teacher(x, t, c), frozen(x, t, context=c), atol=1e-6)
        assert not torch.allclose(tiny.model.diffusion_model(x, t, context=c), frozen(x, t, context=c), atol=1e-6)


def test_reused_trajectory_targets_are_the_teachers_predictions(tiny):
    trainer = ESDTrainer(tiny, settings(sample_from="base", targets_per_trajectory=4, negative_guidance=2.0))
    targets = trainer._trajectory_targets()
    assert len(targets) == 4 and len({int(t) for _, t, _, _ in targets}) == 4
    for x_t, t, context, target in targets:
        e_uncond = trainer.teacher(x_t, t, trainer.uncond)
        e_concept = trainer.teacher(x_t, t, context)
        assert torch.allclose(target, e_uncond - 2.0 * (e_concept - e_uncond), atol=1e-5)


def test_erase_from_trains_the_student_on_the_broader_concept(tiny):
    trainer = ESDTrainer(tiny, settings(prompt="red", erase_from="circle"))
    x_t, t, context, target = trainer._targets()
    assert torch.equal(context, trainer.anchor)
    e_b, e_a, e_0 = (trainer.teacher(x_t, t, c) for c in (trainer.anchor, trainer.concepts[:1], trainer.uncond))
    assert torch.allclose(target, e_b - (e_a - e_0), atol=1e-5)
    with pytest.raises(UsageError, match="equals the concept"):
        settings(erase_from="circle").check()


@pytest.mark.parametrize("reuse", [1, 3])
def test_resume_gives_the_weights_of_an_uninterrupted_run(new_tiny, tmp_path, reuse):
    def fresh():
        model = new_tiny()
        kw = {"sample_from": "base", "targets_per_trajectory": reuse} if reuse > 1 else {}
        return ESDTrainer(model.eval(), settings(**kw))

    whole = fresh()
    for _ in range(5):
        whole.step()
    first = fresh()
    for _ in range(2):
        first.step()
    atomic_save(first.state_dict(), tmp_path / "last.pt")
    second = fresh()
    second.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True))
    for _ in range(3):
        second.step()
    assert second.losses == whole.losses
    for a, b in zip(whole.params.values(), second.params.values()):
        assert torch.equal(a, b)


def test_non_finite_loss_stops_before_changing_weights(tiny):
    trainer = ESDTrainer(tiny, settings())
    trainer.step()
    with torch.no_grad():
        list(trainer.params.values())[0].fill_(float("nan"))
    kept = [p.clone() for p in list(trainer.params.values())[1:]]
    with pytest.raises(NonFiniteLoss, match="at iteration 2"):
        trainer.step()
    assert all(torch.equal(a, b) for a, b in zip(kept, list(trainer.params.values())[1:])) and trainer.iteration == 1


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    unet = tiny.model.diffusion_model
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 16, 256)
    grads = []
    for enabled in (False, True):
        unet.set_gradient_checkpointing(enabled).zero_grad()
        unet(x, t, context=c).square().mean().backward()
        grads.append([p.grad.clone() for p in unet.parameters()])
    unet.set_gradient_checkpointing(False)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_script_erases_resumes_and_refuses_to_overwrite(run_name, tmp_path):
    run_dir = models_dir() / run_name
    # --image_size 32: x_t and the before/after samples at half tiny-sd's size (a quarter of the work)
    args = ["--prompt", "circle", "--iterations", 4, "--ddim_steps", 6, "--lr", 1e-3, "--run_name", run_name,
            "--save_every", 2, "--devices", "cpu", "--image_size", 32]
    done = call_script("train-scripts/train-esd.py", *args)
    assert done.returncode == 0, done.stderr
    for name in (TRAINED_PARAMS, "config.yaml", "loss.txt", "loss.png", "samples.png", "checkpoints/last.pt",
                 "diffusers/unet/config.json"):
        assert (run_dir / name).is_file(), name
    assert len((run_dir / "loss.txt").read_text().split()) == 4
    config = OmegaConf.load(run_dir / "config.yaml")
    assert config.run.prompt == "circle" and config.run.method == "esd-x" and len(config.base_model.ckpt_sha256) == 64
    loaded = load_model(run_name)
    assert loaded.kind == "run" and loaded.method.name == "esd-x"
    base = load_model_from_config(TINY / "config.yaml", TINY / "model.ckpt").state_dict()
    differ = {k for k, v in loaded.model.state_dict().items() if not torch.equal(v, base[k])}
    assert differ and all(".attn2." in k for k in differ)
    images = call_script("eval-scripts/generate-images.py", "--model_name", run_name, "--prompts_path",
                         REPO_ROOT / "data/tiny-sd/concepts/circle.csv", "--till_case", 1, "--num_samples", 1,
                         "--ddim_steps", 5, "--save_path", tmp_path / "images", "--device", "cpu")
    assert images.returncode == 0, images.stderr
    assert (tmp_path / "images" / run_name / "0_0.png").is_file()

    again = call_script("train-scripts/train-esd.py", *args)
    assert "already exists" in one_line_error(again) and "--overwrite" in again.stderr
    bad = call_script("train-scripts/train-esd.py", *args, "--overwrite", "--train_method", "attention")
    assert "unknown" in one_line_error(bad) and (run_dir / TRAINED_PARAMS).is_file()  # a bad flag never costs the old run
    other_lr = [a if a != 1e-3 else 2e-3 for a in args]
    assert "nothing to resume" in one_line_error(call_script("train-scripts/train-esd.py", *other_lr, "--resume"))

    # a killed erase leaves its partial folder with the resumable state (here: that of iteration 4); it resumes
    # only with the settings it started with
    from safetensors.torch import load_file
    trained = load_file(run_dir / TRAINED_PARAMS)
    partial = models_dir() / f".{run_name}.partial"
    run_dir.rename(partial)
    assert "started with other settings (lr)" in one_line_error(
        call_script("train-scripts/train-esd.py", *other_lr, "--resume"))
    same = call_script("train-scripts/train-esd.py", *args, "--resume", "--no_samples", "--no_diffusers")
    assert same.returncode == 0, same.stderr
    assert not partial.exists() and (run_dir / TRAINED_PARAMS).is_file()
    resumed = load_file(run_dir / TRAINED_PARAMS)
    assert resumed.keys() == trained.keys() and all(torch.equal(resumed[k], trained[k]) for k in trained)


def test_erase_py_esd_u_trains_all_but_cross_attention(run_name):
    """erase.py --method esd-u: the run records its registry name and, loaded, differs from the base outside
    cross-attention, time embedding and output layers only."""
    done = call_script("train-scripts/erase.py", "--method", "esd-u", "--prompt", "moon", "--iterations", 2,
                       "--ddim_steps", 2, "--lr", 1e-3, "--run_name", run_name, "--devices", "cpu", "--no_diffusers",
                       "--no_samples")
    assert done.returncode == 0, done.stderr
    loaded = load_model(run_name)
    assert loaded.method.name == "esd-u" and loaded.config.run.train_method == "noxattn"
    base = load_model_from_config(TINY / "config.yaml", TINY / "model.ckpt").state_dict()
    differ = {k for k, v in loaded.model.state_dict().items() if not torch.equal(v, base[k])}
    assert differ and all(k.startswith("model.diffusion_model.") for k in differ)
    assert not any(".attn2." in k or "time_embed" in k or ".diffusion_model.out." in k for k in differ)


@pytest.mark.parametrize("flags, message", [
    (["--train_method", "attention"], "unknown; use one of"),
    (["--train_method", "xlayer"], "selects no parameters"),
    (["--erase_from", "circle"], "equals the concept"),
    (["--devices", "3"], "does not exist"),
    (["--prompt", ""], "empty"),
    (["--prompt_templates", "no-such-templates.txt"], "does not exist"),
])
def test_script_bad_input_is_one_line(run_name, flags, message):
    result = call_script("train-scripts/train-esd.py", "--prompt", "circle", "--iterations", 1, "--run_name",
                         run_name, *flags)
    assert message in one_line_error(result)
    assert not (models_dir() / run_name).exists() and not (models_dir() / f".{run_name}.partial").exists()


def test_script_runs_on_sd_v1_structure(run_name, small_config_path, small_ckpt):
    """SD v1's config (reduced width, random weights): the layer-specific methods find their layers."""
    result = call_script("train-scripts/train-esd.py", "--prompt", "Van Gogh", "--train_method", "xlayer",
                         "--config_path", small_config_path, "--ckpt_path", small_ckpt, "--iterations", 2,
                         "--ddim_steps", 4, "--run_name", run_name, "--no_diffusers", "--no_samples", "--devices", "cpu")
    assert result.returncode == 0, result.stderr
    config = OmegaConf.load(models_dir() / run_name / "config.yaml")
    assert config.run.iterations == 2 and config.run.lr == 1e-5  # the original's defaults, not tiny-sd's
    assert config.run.sample_from == "esd" and config.run.targets_per_trajectory == 1
    assert config.run.method == "esd-xlayer"
    from safetensors.torch import load_file
    keys = load_file(models_dir() / run_name / TRAINED_PARAMS)
    assert keys and all(".attn2." in k and (".output_blocks.6." in k or ".output_blocks.8." in k) for k in keys)


def test_teacher_copy_on_a_second_device_and_cpu_autocast(tiny, new_tiny):
    """``--devices cpu,cpu`` takes the original's path (a whole frozen UNet copy) and trains the same
    weights as the one-UNet teacher; ``--mixed_precision bf16`` autocasts on the CPU, weights stay fp32."""
    one = ESDTrainer(tiny, settings())
    two = ESDTrainer(new_tiny(), settings(), "cpu", "cpu")
    assert two.teacher.copy is not None and one.teacher.copy is None
    for _ in range(3):
        one.step(), two.step()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(one.params.values(), two.params.values()))
    half = ESDTrainer(tiny, settings(), autocast_dtype=torch.bfloat16)
    seen = []  # the UNet casts its output back to the input's dtype; its layers show the autocast
    hook = dict(half.unet.named_modules())[half.trained_names[0].rsplit(".", 1)[0]].register_forward_hook(
        lambda module, args, out: seen.append(out.dtype))
    with half.autocast():
        half.unet(torch.randn(1, 4, 16, 16), torch.tensor([5]), context=half.uncond)
    hook.remove()
    assert seen == [torch.bfloat16]
    assert all(math.isfinite(half.step()) for _ in range(2)) and all(p.dtype == torch.float32 for p in half.params.values())


@pytest.mark.slow
def test_script_resumes_a_killed_run_to_the_weights_of_an_uninterrupted_one(run_name):
    """End to end, as a user meets it: train-esd.py killed mid-run in its own process, then --resume."""
    killed, whole = f"{run_name}-killed", f"{run_name}-whole"
    args = ["--prompt", "star", "--iterations", 60, "--ddim_steps", 10, "--lr", 1e-3, "--save_every", 5,
            "--devices", "cpu", "--no_diffusers", "--no_samples"]
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "train-scripts/train-esd.py"), *map(str, args),
                                "--run_name", killed], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = models_dir() / f".{killed}.partial" / "checkpoints" / "last.pt"
    while process.poll() is None and not state_file.is_file():
        time.sleep(0.05)
    process.kill()
    process.wait()
    reached = torch.load(state_file, weights_only=True)["iteration"]
    assert 5 <= reached < 60, reached  # killed mid-run
    assert "is incomplete" in one_line_error(call_script("eval-scripts/sample-grid.py", "--model_name", killed))
    resumed = run_script("train-scripts/train-esd.py", *args, "--run_name", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    done = call_script("train-scripts/train-esd.py", *args, "--run_name", whole, "--save_compvis")
    assert done.returncode == 0, done.stderr
    from safetensors.torch import load_file
    a, b = load_file(models_dir() / killed / TRAINED_PARAMS), load_file(models_dir() / whole / TRAINED_PARAMS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len((models_dir() / killed / "loss.txt").read_text().split()) == 60
    # --save_compvis: the whole edited checkpoint, loaded as the run, holds the trained weights
    state = load_model(whole).model.state_dict()
    assert (models_dir() / whole / "model.ckpt").is_file() and all(torch.equal(state[k], b[k]) for k in b)


def test_script_stops_on_a_non_finite_loss_and_keeps_the_last_good_state(run_name):
    result = call_script("train-scripts/train-esd.py", "--prompt", "circle", "--iterations", 5, "--ddim_steps", 4,
                         "--lr", 1e30, "--run_name", run_name, "--devices", "cpu", "--no_diffusers")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "at iteration" in errors[0] and "lower --lr" in errors[0]
    assert not (models_dir() / run_name).exists()  # never a run folder of a failed erase
    state = torch.load(models_dir() / f".{run_name}.partial" / "checkpoints" / "last.pt", weights_only=True)
    assert 1 <= state["iteration"] < 5 and all(torch.isfinite(v).all() for v in state["params"].values())


def test_sweep_grid_and_tables():
    """bench/esd_sweep.py's grid designs and its table of merged sweep files (a cell's keying and running are the
    benchmark's, tested with it)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("esd_sweep", REPO_ROOT / "bench/esd_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    grid = sweep.parse_grid(["lr=1e-4, 5e-4", "--negative_guidance=1,2"])
    assert grid == {"lr": ["1e-4", "5e-4"], "negative_guidance": ["1", "2"]}
    runs = sweep.combinations(grid)
    assert len(runs) == 4 and {"lr": "5e-4", "negative_guidance": "1"} in runs
    grid["iterations"] = ["200", "400", "800"]
    assert sweep.one_at_a_time(grid) == [
        {"lr": "1e-4", "negative_guidance": "1", "iterations": "200"},
        {"lr": "5e-4", "negative_guidance": "1", "iterations": "200"},
        {"lr": "1e-4", "negative_guidance": "2", "iterations": "200"},
        {"lr": "1e-4", "negative_guidance": "1", "iterations": "400"},
        {"lr": "1e-4", "negative_guidance": "1", "iterations": "800"}]
    with pytest.raises(UsageError):
        sweep.parse_grid(["lr"])
    import pandas as pd

    def row(run, measure, group, edited=0.05, change=-1.0, verdict="met"):
        return {"run": run, "concept": "heart", "lr": run, "fixed": "", "group": group, "measure": measure,
                "edited": edited, "edited_low": 0.01, "edited_high": 0.09, "change_points": change,
                "change_low": change - 1, "change_high": change + 1, "verdict": verdict, "erase_seconds": 61.0}
    earlier = pd.DataFrame([row("1e-3", "x", "efficacy"), row("1e-2", "x", "efficacy")])
    merged = sweep.merge_rows(earlier, pd.DataFrame([row("1e-3", "y", "efficacy")]))
    assert list(zip(merged.run, merged.measure)) == [("1e-2", "x"), ("1e-3", "y")]  # kept, and re-measured
    frame = pd.DataFrame([row(lr, m, g) for lr in ("1e-3", "3e-4") for m, g in (
        ("'heart' found, alone", "efficacy"), ("'heart' found, with_others", "efficacy"),
        ("object 'star'", "same attribute"), ("other objects (mean of 7)", "same attribute"),
        ("color (mean over values)", "other attributes"), ("style (mean over values)", "other attributes"))])
    lines = sweep.markdown_table(frame).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| concept | lr | found, alone")
    assert lines[2] == ("| heart | 1e-3 | 5% [1%, 9%] met | 5% [1%, 9%] met | -1.0 [-2.0, +0.0] met | "
                        "color -1.0 [-2.0, +0.0] met; style -1.0 [-2.0, +0.0] met | 61 |")
    other_sweep = frame[frame.run == "3e-4"].drop(columns="lr").assign(run="it400", iterations="400")
    other_sweep = other_sweep[["run", "concept", "iterations"] + list(frame.columns[3:])]
    both = sweep.markdown_table(sweep.merge_rows(frame, other_sweep)).splitlines()
    assert both[0].startswith("| concept | lr | iterations |") and both[-1].startswith("| heart | default | 400 |")
