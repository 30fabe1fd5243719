"""One loader, and results keyed by the exact weights: every path that could report one model's images
as another's (stale results) is checked here."""
import json
import pytest
import torch

from ldm.evaluator import ConceptClassifier, check_autoencoder, save_evaluator, load_evaluator
from ldm.loading import load_model
from ldm.runs import base_identity, save_trained_params, write_run_config
from ldm.training import check_resume
from ldm.util import UsageError, tensors_sha256

from conftest import call_script, one_line_error

CSV = "prompt,evaluation_seed,case_number\na red star,11,0\na blue moon,13,7\n"


def _perturbed_copy(small_ckpt, path, delta):
    """A checkpoint of exactly the same size as ``small_ckpt`` with other weights."""
    state = torch.load(small_ckpt, weights_only=True)
    key = "model.diffusion_model.out.2.bias"
    state["state_dict"] = {**state["state_dict"], key: state["state_dict"][key] + delta}
    torch.save(state, path)
    return path


@pytest.fixture
def own_ckpt(small_ckpt, tmp_path):
    return _perturbed_copy(small_ckpt, tmp_path / "base.ckpt", 0.0)  # written as the perturbed copies are


def _make_run(run_dir, config, config_path, ckpt):
    """A run folder as the train scripts write it: trained attn2 parameters over a named base."""
    model = load_model(config_path=config_path, ckpt_path=ckpt).model
    trained = {k: v + 0.05 for k, v in model.state_dict().items() if ".attn2.to_k." in k}
    run_dir.mkdir()
    write_run_config(run_dir, config, {"method": "esd-x", "prompt": "star"}, base_identity(config_path, ckpt))
    save_trained_params(run_dir, trained, {"method": "esd-x"})
    return trained


def _generate(config_path, ckpt, csv, save_path, *extra):
    return call_script("eval-scripts/generate-images.py", "--ckpt_path", ckpt, "--config_path", config_path,
                      "--prompts_path", csv, "--save_path", save_path, "--model_name", "m", "--num_samples", 2,
                      "--ddim_steps", 2, "--device", "cpu", *extra)


def test_identity_is_the_hash_of_the_files(small_config_path, own_ckpt, tmp_path):
    first = load_model(config_path=small_config_path, ckpt_path=own_ckpt)
    again = load_model(config_path=small_config_path, ckpt_path=own_ckpt)
    assert first.sha256 == again.sha256 and len(first.sha256) == 64
    _perturbed_copy(own_ckpt, own_ckpt, 1.0)  # same path, same size, other weights
    changed = load_model(config_path=small_config_path, ckpt_path=own_ckpt)
    assert changed.sha256 != first.sha256
    assert changed.identity["model_config"] == first.identity["model_config"]  # the config's model: section
    assert changed.identity["files"]["checkpoint"] != first.identity["files"]["checkpoint"]


@pytest.mark.slow  # an end-to-end run of the scripts: the slow tier
def test_retrained_weights_or_an_edited_csv_never_reuse_images(small_config_path, own_ckpt, tmp_path):
    csv = tmp_path / "prompts.csv"
    csv.write_text(CSV)
    assert _generate(small_config_path, own_ckpt, csv, tmp_path / "out").returncode == 0
    record = json.loads((tmp_path / "out" / "m" / "generation.json").read_text())
    assert len(record["model"]["files"]["checkpoint"]) == 64 and len(record["prompts_sha256"]) == 64
    _perturbed_copy(own_ckpt, own_ckpt, 1.0)  # "retrained" in place: same path, same size
    assert "model.files.checkpoint" in one_line_error(_generate(small_config_path, own_ckpt, csv, tmp_path / "out"))
    assert _generate(small_config_path, own_ckpt, csv, tmp_path / "out2").returncode == 0
    csv.write_text(CSV.replace("a blue moon", "a green moon"))  # an edited CSV, same file name
    assert "prompts_sha256" in one_line_error(_generate(small_config_path, own_ckpt, csv, tmp_path / "out2"))


def test_overwrite_clears_images_the_new_run_does_not_make(small_config_path, small_ckpt, tmp_path):
    csv = tmp_path / "prompts.csv"
    csv.write_text(CSV)
    assert _generate(small_config_path, small_ckpt, csv, tmp_path).returncode == 0
    assert len(list((tmp_path / "m").glob("*.png"))) == 4
    result = _generate(small_config_path, small_ckpt, csv, tmp_path, "--num_samples", 1, "--till_case", 0,
                       "--overwrite")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "m").glob("*.png")) == ["0_0.png"]
    assert json.loads((tmp_path / "m" / "generation.json").read_text())["num_samples"] == 1


def test_run_over_another_base_is_refused_unless_forced(small_config, small_config_path, own_ckpt, tmp_path):
    run_dir = tmp_path / "run"
    trained = _make_run(run_dir, small_config, small_config_path, own_ckpt)
    loaded = load_model(run_dir)
    assert loaded.kind == "run" and loaded.identity["base"]["files"]["checkpoint"] == \
        load_model(config_path=small_config_path, ckpt_path=own_ckpt).identity["files"]["checkpoint"]
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())
    before = loaded.sha256

    size = own_ckpt.stat().st_size
    _perturbed_copy(own_ckpt, own_ckpt, 1.0)
    assert own_ckpt.stat().st_size == size  # a size check could not tell them apart
    with pytest.raises(UsageError, match="not the one run 'run' was trained on.*--force_base"):
        load_model(run_dir)
    forced = load_model(run_dir, force_base=True)
    assert forced.sha256 != before  # the base's hash is part of the run's identity

    grid = call_script("eval-scripts/sample-grid.py", "--model_name", run_dir, "--ddim_steps", 2, "--device", "cpu",
                       "--out", tmp_path / "grid.png")
    assert "--force_base" in one_line_error(grid)
    csv = tmp_path / "prompts.csv"
    csv.write_text(CSV)
    forced = call_script("eval-scripts/generate-images.py", "--model_name", run_dir, "--prompts_path", csv,
                         "--save_path", tmp_path / "images", "--num_samples", 1, "--ddim_steps", 2, "--device", "cpu",
                         "--force_base")
    assert forced.returncode == 0 and "warning:" in forced.stderr, forced.stderr
    assert sorted(p.name for p in (tmp_path / "images" / "run").glob("*.png")) == ["0_0.png", "7_0.png"]


def test_changed_run_params_change_the_identity(small_config, small_config_path, own_ckpt, tmp_path):
    run_dir = tmp_path / "run"
    trained = _make_run(run_dir, small_config, small_config_path, own_ckpt)
    before = load_model(run_dir).sha256
    save_trained_params(run_dir, {k: v + 1 for k, v in trained.items()}, {"method": "esd-x"})
    assert load_model(run_dir).sha256 != before


def test_convert_script_loads_runs_by_name(small_config, small_config_path, own_ckpt, tmp_path):
    run_dir = tmp_path / "run"
    _make_run(run_dir, small_config, small_config_path, own_ckpt)
    result = call_script("train-scripts/convertModels.py", "--model_name", run_dir, "--diffusers_path",
                        tmp_path / "diffusers", "--unet_only")
    assert result.returncode == 0 and "identity" in result.stdout, result.stderr


def test_lightning_resume_refuses_other_settings(tmp_path):
    settings = {"fingerprint": {"config": {"lr": 1}, "world": {"seed": 0}}, "seed": 0}
    check_resume(tmp_path, settings)
    (tmp_path / "last.ckpt").write_bytes(b"")
    check_resume(tmp_path, settings)  # the same run resumes
    with pytest.raises(UsageError, match=r"other settings \(fingerprint.world.seed\)"):
        check_resume(tmp_path, {**settings, "fingerprint": {"config": {"lr": 1}, "world": {"seed": 1}}})
    (tmp_path / "run.json").unlink()
    with pytest.raises(UsageError, match="no run.json"):
        check_resume(tmp_path, settings)


def test_train_tiny_sd_never_replaces_a_model_unasked(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"")
    result = call_script("train-scripts/train-tiny-sd.py", "--out_dir", tmp_path, "--work_dir", tmp_path / "work")
    assert "--overwrite" in one_line_error(result)


def test_evaluator_records_its_autoencoder(small_model, tmp_path, capsys):
    path = save_evaluator(ConceptClassifier(width=8), tmp_path / "evaluator.safetensors", small_model.first_stage_model)
    evaluator = load_evaluator(path)
    assert evaluator.metadata["autoencoder_sha256"] == tensors_sha256(small_model.first_stage_model.state_dict())
    assert check_autoencoder(evaluator, small_model.first_stage_model)
    with torch.no_grad():
        first_stage = small_model.first_stage_model
        original = first_stage.post_quant_conv.bias.clone()
        first_stage.post_quant_conv.bias.add_(1)
        try:
            assert not check_autoencoder(evaluator, first_stage)
        finally:
            first_stage.post_quant_conv.bias.copy_(original)
    assert "another autoencoder" in capsys.readouterr().err
