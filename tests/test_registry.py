"""The method registry and its one erase entry point: every method's flags come from its settings, resolve
flag > model config > paper, reach the trainer, and give the same weights through every script."""
import re

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.erasure import erase, methods
from ldm.erasure.settings import resolve, setting_fields
from ldm.identity import compvis_identity
from ldm.loading import load_model
from ldm.paths import REPO_ROOT, TINY_SD_DIR, models_dir
from ldm.util import UsageError, load_config, tensors_sha256

from conftest import TINY, call_script, one_line_error

MAIN_METHODS = ["esd-x", "esd-u", "cie", "sepce", "cpe"]
RUN_FLAGS = {"config_path", "ckpt_path", "unsafe_pickle", "devices", "save_every", "resume", "overwrite",
             "save_compvis", "no_diffusers", "no_samples", "run_name", "show_settings", "help", "method"}


def flags_of(method):
    return {f.name for f in setting_fields(method.settings) if f.metadata["flag"] and f.name not in method.fixed}


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_help_lists_the_methods_own_flags_and_no_other(name):
    method = methods.get(name)
    done = call_script("train-scripts/erase.py", "--method", name, "--help")
    code, out = done.returncode, done.stdout
    assert code == 0 and method.description.split(":")[0] in out
    shown = set(re.findall(r"--([a-z0-9_]+)", out))
    assert flags_of(method) <= shown
    others = set().union(*(flags_of(m) for m in methods.REGISTRY)) - flags_of(method)
    assert not shown & others, f"{name} --help shows other methods' flags {shown & others}"
    assert shown - flags_of(method) - {"separator", "mixed_precision", "gradient_checkpointing"} <= RUN_FLAGS
    assert ("mixed_precision" in shown) == method.mixed_precision


def test_erase_needs_a_method_and_lists_them():
    line = one_line_error(call_script("train-scripts/erase.py", "--prompt", "moon"))
    assert "--method is required" in line and all(m in line for m in methods.METHODS)
    done = call_script("train-scripts/erase.py", "--help")
    code, out = done.returncode, done.stdout
    assert code == 0 and all(m in out for m in methods.METHODS)
    refused = call_script("train-scripts/erase.py", "--method", "mace", "--prompt", "x")
    assert "invalid choice: 'mace'" in one_line_error(refused)


@pytest.mark.parametrize("name, from_config", [("esd-x", "lr"), ("esd-u", "negative_guidance"), ("cie", "tau"),
                                               ("sepce", "warmup"), ("cpe", "neutral")])
def test_show_settings_names_each_source_and_loads_no_model(name, from_config, tmp_path):
    done = call_script("train-scripts/erase.py", "--method", name, "--prompt", "moon", "--seed", 3, "--show_settings",
                       "--ckpt_path", tmp_path / "no-such.ckpt")  # a model load would fail on this path
    out = done.stdout
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {f.name for f in setting_fields(methods.get(name).settings)}
    assert rows["seed"].rstrip().endswith("(flag)") and " 3 " in rows["seed"]
    assert "(model config " in rows[from_config]
    assert any(row.rstrip().endswith("(paper)") for row in rows.values())


# Per settings class: a non-default value for every setting a model config may set (CONFIG), and for every flag
# (FLAGS; several sets where two settings exclude each other). A new setting fails the test until it is listed.
def _files(tmp_path):
    templates = tmp_path / "templates.txt"
    templates.write_text("a picture of {}\n{} in a field\n")
    words = tmp_path / "words.txt"
    words.write_text("a photo\na drawing\n")
    return {"templates": str(templates), "words": str(words)}


def _values(family, files):
    if family == "esd":
        config = {"start_guidance": 2.5, "negative_guidance": 1.5, "iterations": 2, "lr": 2e-4, "ddim_steps": 6,
                  "image_size": 32, "prompt_templates": files["templates"], "sample_from": "base",
                  "targets_per_trajectory": 2, "x_t": "t"}
        flags = [{**{k: v * 2 if isinstance(v, (int, float)) else v for k, v in config.items()},
                  "prompt": "moon", "seperator": ",", "seed": 7, "sample_from": "base", "image_size": 64,
                  "prompt_templates": files["templates"]},
                 {"prompt": "moon", "erase_from": "red", "lr": 3e-4, "prompt_templates": "none",
                  "targets_per_trajectory": 1, "x_t": "authors"}]
        return config, flags
    if family in ("cie", "sepce"):
        config = {"num_images": 2, "iterations": 3, "lr": 2e-4, "l1_weight": 3e-5, "tau": -2e-3, "warmup": 4,
                  "momentum": 0.8, "batch_size": 2, "prompt_templates": files["templates"], "gradients": "zero",
                  "l1_scale": "relative", "momentum_start": "zero", "direction_loss": "all"}
        if family == "sepce":
            config.update(beta=0.5, rtol=1e-5)
        flags = {**{k: v * 2 if isinstance(v, (int, float)) and k != "momentum" else v for k, v in config.items()},
                 "momentum": 0.7, "prompt": "heart", "data_dir": str(files["templates"]), "seed": 7,
                 "gradients": "accumulate", "l1_scale": "absolute", "momentum_start": "first"}
        if family == "sepce":
            flags["keep"] = "star,moon"  # "on" (an earlier run) is exercised by test_sepce's iterative erasure
        return config, [flags]
    if family == "uce":
        config = {"guide": "a thing", "preserve": "star", "concept_type": "art", "expand_prompts": "true",
                  "erase_scale": 2.0, "preserve_scale": 0.5, "lamb": 0.25}
        flags = {**{k: v * 2 if isinstance(v, float) else v for k, v in config.items()},
                 "prompt": "moon;heart", "seperator": ";", "preserve": "star;circle", "guide": "",
                 "concept_type": "object", "expand_prompts": "false"}
        return config, [flags]
    config = {"anchor_words": files["words"], "anchor_vocab": files["words"], "nearest_anchors": 1,
              "neutral": "a thing", "prompt_templates": files["templates"], "eta": 0.7, "anchor_weight": 50.0,
              "anchor_batch": 3, "rank": 2, "gate_rank": 4, "alpha": 2.0, "stages": 2, "iterations": 2,
              "first_stage_factor": 2, "lr": 1e-4, "first_stage_lr_factor": 5.0, "warmup": 1, "adv_embeddings": 2,
              "adv_lr": 2e-2, "anchor_noise": 2e-3, "anchor_scope": "every-concept", "gate_temperature": 2.0,
              "gate_floor": 0.3, "gate_combination": "highest-gate", "adv_iterations": 2}
    flags = {**{k: v * 2 if isinstance(v, (int, float)) else v for k, v in config.items()},
             "prompt": "moon;heart", "seperator": ";", "anchors": "a photo,a circle", "seed": 7}
    return config, [flags]


def _argv(values):
    return [a for k, v in values.items() for a in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def tiny_model():
    return load_model("tiny-sd").model


@pytest.mark.parametrize("name", [*MAIN_METHODS, "uce"])
def test_every_model_config_setting_and_every_flag_reaches_the_trainer(name, tiny_model, tmp_path):
    method = methods.get(name)
    config_values, flag_sets = _values(method.family, _files(tmp_path))
    settable = {f.name for f in setting_fields(method.settings) if f.metadata["config"] and f.name not in method.fixed}
    assert set(config_values) == settable, "list every model-config setting in _values"
    assert set().union(*flag_sets) | ({"on"} if name == "sepce" else set()) == flags_of(method)
    model_config = OmegaConf.merge(load_config(TINY / "config.yaml"), {method.config_blocks[-1]: config_values})
    config_path = tmp_path / "model.yaml"
    OmegaConf.save(model_config, config_path)
    latents = torch.randn(4, 4, 16, 16)
    prompt = flag_sets[0]["prompt"].split(";")[0].split(",")[0]
    for flags, expected_source in [({"prompt": prompt}, "model config"), *[(f, "flag") for f in flag_sets]]:
        parser = erase.method_parser(method, "test")
        args = erase.parse_method_args(parser, method, ["--config_path", str(config_path), *_argv(flags)])
        settings, sources, _ = erase.resolve_settings(method, args)
        expected = {**config_values, **flags} if expected_source == "flag" else {**config_values, "prompt": prompt}
        for key, value in expected.items():
            assert getattr(settings, key) == value, key
            assert sources[key].startswith("flag" if key in flags else "model config"), (key, sources[key])
        trainer = method.build(settings, tiny_model, [torch.device("cpu")], None, lambda: latents)
        assert trainer.settings.as_dict() == settings.as_dict()
        assert trainer.total_iterations() >= 1


def test_esd_trajectory_reuse_follows_the_users_sampler_and_variants_override_the_family():
    config = OmegaConf.create({"esd_defaults": {"lr": 1e-3, "sample_from": "base", "targets_per_trajectory": 5},
                               "esd-u_defaults": {"lr": 5e-4}})
    x, u = methods.get("esd-x"), methods.get("esd-u")
    settings, sources = resolve(x.settings, {"prompt": "moon", "sample_from": "esd"}, config, x.config_blocks, x.fixed)
    assert settings.targets_per_trajectory == 1 and settings.lr == 1e-3
    settings, sources = resolve(u.settings, {"prompt": "moon"}, config, u.config_blocks, u.fixed)
    assert settings.lr == 5e-4 and sources["lr"] == "model config esd-u_defaults"
    assert settings.train_method == "noxattn" and sources["train_method"] == "method"
    with pytest.raises(UsageError, match="needs --sample_from base"):
        resolve(x.settings, {"prompt": "moon", "sample_from": "esd", "targets_per_trajectory": 3}, config,
                x.config_blocks, x.fixed)


@pytest.mark.parametrize("block, message", [({"learning_rate": 1e-3}, "no setting of this method"),
                                            ({"prompt": "moon"}, "set per run")])
def test_a_bad_model_config_block_is_one_line(block, message):
    method = methods.get("cie")
    with pytest.raises(UsageError, match=message):
        resolve(method.settings, {"prompt": "heart"}, OmegaConf.create({"cie_defaults": block}), method.config_blocks)


@pytest.mark.parametrize("script, argv, message", [
    ("train-cpe.py", ["--prompt", "moon", "--mixed_precision", "no"], "not a flag of cpe"),
    ("erase.py", ["--method", "cie", "--prompt", "heart", "--anchors", "a"], "not a flag of cie"),
    ("erase.py", ["--method", "esd-x", "--prompt", "moon", "--keep", "a"], "not a flag of esd-x"),
    ("train-esd.py", ["--prompt", "moon", "--train_method", "attention"], "train method 'attention' unknown"),
    ("train-sepce.py", ["--prompt", "heart", "--devices", "cpu,cpu"], "one device"),
    ("erase.py", ["--method", "esd-x", "--prompt", "moon", "--negative_guidance", "-3"], "positive"),
    ("erase.py", ["--method", "esd-x", "--prompt", "moon", "--run_name", "../victim"], "one folder name"),
    ("erase.py", ["--method", "cie", "--prompt", "heart", "--no_such_flag", "1"], "unrecognized arguments"),
])
def test_a_flag_a_method_does_not_use_or_a_bad_value_is_one_line(script, argv, message):
    assert message in one_line_error(call_script(f"train-scripts/{script}", *argv))


TRAIN = {"esd-x": ("train-esd.py", ["--train_method", "xattn", "--iterations", 2, "--ddim_steps", 4]),
         "esd-u": ("train-esd.py", ["--train_method", "noxattn", "--iterations", 2, "--ddim_steps", 4]),
         "cie": ("train-cie.py", ["--iterations", 2, "--num_images", 2]),
         "sepce": ("train-sepce.py", ["--iterations", 2, "--num_images", 2]),
         "cpe": ("train-cpe.py", ["--stages", 2, "--iterations", 2, "--adv_embeddings", 2, "--nearest_anchors", 3])}
CONCEPT = {"esd-x": "moon", "esd-u": "moon", "cie": "heart", "sepce": "heart", "cpe": "moon"}


@pytest.mark.slow  # an end-to-end run of the scripts: the slow tier
@pytest.mark.parametrize("name", MAIN_METHODS)
def test_each_script_and_erase_py_write_the_same_weights(name):
    script, flags = TRAIN[name]
    common = ["--prompt", CONCEPT[name], *[f for f in flags if f not in ("--train_method", "xattn", "noxattn")],
              "--no_diffusers", "--no_samples"]
    done = call_script(f"train-scripts/{script}", *common, *flags[:2] if name.startswith("esd") else [],
                       "--run_name", f"script-{name}")
    assert done.returncode == 0, done.stderr
    done = call_script("train-scripts/erase.py", "--method", name, *common, "--run_name", f"erase-{name}")
    assert done.returncode == 0, done.stderr
    edits = {kind: {p.name: tensors_sha256(load_file(p)) for p in sorted((models_dir() / f"{kind}-{name}").glob(
        "*.safetensors"))} for kind in ("script", "erase")}
    assert edits["script"] and edits["script"] == edits["erase"]
    loaded = load_model(f"erase-{name}")
    assert loaded.method.name == name and loaded.config.run.method == name


def test_runs_recorded_by_older_versions_still_load(tmp_path):
    old = {"xattn": "esd-x", "noxattn": "esd-u", "esd-x-strict": "esd-x-strict", "full": "esd-all"}
    for train_method, name in old.items():
        config = OmegaConf.create({"run": {"method": "esd", "train_method": train_method}})
        assert methods.method_of_run(config).name == name
    assert methods.method_of_run(OmegaConf.create({"run": {"method": "sepce"}})).name == "sepce"
    with pytest.raises(UsageError, match="cannot load"):
        methods.method_of_run(OmegaConf.create({"run": {"method": "uce-v0"}}))


def test_identity_is_the_weights_and_the_model_section(tmp_path):
    config = load_config(TINY_SD_DIR / "config.yaml")
    base = compvis_identity(TINY_SD_DIR / "config.yaml", TINY_SD_DIR / "model.ckpt")["sha256"]
    defaults_changed = OmegaConf.merge(config, {"cpe_defaults": {"neutral": "a thing"}, "esd_defaults": {"lr": 1.0}})
    OmegaConf.save(defaults_changed, tmp_path / "a.yaml")
    assert compvis_identity(tmp_path / "a.yaml", TINY_SD_DIR / "model.ckpt")["sha256"] == base
    model_changed = OmegaConf.merge(config, {"model": {"params": {"scale_factor": 0.5}}})
    OmegaConf.save(model_changed, tmp_path / "b.yaml")
    assert compvis_identity(tmp_path / "b.yaml", TINY_SD_DIR / "model.ckpt")["sha256"] != base


def test_report_on_a_model_that_is_not_a_run_says_what_to_pass():
    assert "pass --concept" in one_line_error(call_script("eval-scripts/erasure-report.py", "--model_name", "tiny-sd"))


@pytest.mark.parametrize("name,key,value", [("cpe", "anchor_scope", "everything"), ("cie", "gradients", "sum"),
                                            ("esd-x", "x_t", "late")])
def test_a_model_configs_value_outside_a_settings_choices_is_one_line(name, key, value):
    """Flags meet argparse's choices; a model config's block meets the same list, checked once for every method."""
    method = methods.get(name)
    config = OmegaConf.create({method.config_blocks[-1]: {key: value}})
    with pytest.raises(UsageError, match=f"--{key} must be one of .*, got '{value}'"):
        resolve(method.settings, {"prompt": "moon"}, config, method.config_blocks, method.fixed)
