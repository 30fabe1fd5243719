"""Faults and bad input a user meets: each refused in one line or recovered, nothing lost, nothing written or
run outside where it belongs."""
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.loading import load_model
from ldm.paths import REPO_ROOT, models_dir
from ldm.runs import RESUME_STATE, finish_run_dir, partial_folder, prepare_run_dir
from ldm.util import UsageError, load_config, load_model_from_config

from conftest import TINY, call_script, one_line_error

ERASE = "train-scripts/erase.py"
FAST_ESD = ["--method", "esd-x", "--prompt", "moon", "--iterations", 1, "--ddim_steps", 2, "--no_diffusers",
            "--no_samples"]
TORN = [*FAST_ESD, "--iterations", 3, "--lr", 1e30]  # the loss is no longer finite after the first step


@pytest.mark.parametrize("name", ["../victim", "/tmp/elsewhere", "my run/sub dir", "..", ".hidden/x"])
def test_a_run_name_is_one_folder_inside_the_models_folder(name):
    victim = models_dir().parent / "victim"
    victim.mkdir(exist_ok=True)
    (victim / "keep.txt").write_text("no run wrote me")
    line = one_line_error(call_script(ERASE, *FAST_ESD, "--run_name", name, "--overwrite"))
    assert "one folder name" in line
    assert (victim / "keep.txt").read_text() == "no run wrote me"


def test_overwrite_replaces_only_a_run_and_only_once_the_new_one_is_complete():
    stray = models_dir() / "not-a-run"
    stray.mkdir(parents=True, exist_ok=True)
    (stray / "notes.txt").write_text("mine")
    assert "not a run folder" in one_line_error(call_script(ERASE, *FAST_ESD, "--run_name", "not-a-run", "--overwrite"))
    assert (stray / "notes.txt").read_text() == "mine"

    assert call_script(ERASE, *FAST_ESD, "--run_name", "swap").returncode == 0
    old = load_model("swap").sha256
    building = prepare_run_dir("swap", overwrite=True)  # an overwrite in progress (or killed) ...
    assert building == partial_folder(models_dir() / "swap") and load_model("swap").sha256 == old  # ... leaves the old
    shutil.rmtree(building)
    assert call_script(ERASE, *FAST_ESD, "--lr", 2e-3, "--run_name", "swap", "--overwrite").returncode == 0
    assert load_model("swap").sha256 != old and not partial_folder(models_dir() / "swap").exists()


def test_a_second_erase_of_a_name_being_erased_is_refused():
    prepare_run_dir("busy")  # what a running (or killed) erase holds
    assert "was interrupted or is running" in one_line_error(call_script(ERASE, *FAST_ESD, "--run_name", "busy"))


def test_a_config_naming_other_code_is_refused_unless_trusted(tmp_path, monkeypatch):
    config = load_config(TINY / "config.yaml")
    marker = tmp_path / "ran"
    config.model.params.cond_stage_config = {"target": "subprocess.run", "params": {"args": ["touch", str(marker)]}}
    folder = models_dir() / "downloaded"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, folder / "config.yaml")
    shutil.copyfile(TINY / "model.ckpt", folder / "model.ckpt")
    line = one_line_error(call_script("eval-scripts/generate-images.py", "--model_name", "downloaded", "--prompts_path",
                          REPO_ROOT / "data/tiny-sd/quality.csv", "--save_path", tmp_path))
    assert "'subprocess.run' is not one of this project's model classes" in line and not marker.exists()
    for target in ("ldm.util.get_obj_from_str", "ldm.leaderboard.run_child", "os.system"):
        config.model.params.cond_stage_config = {"target": target}
        with pytest.raises(UsageError, match="LDM_UNSAFE_CONFIG"):
            load_model_from_config(config)
    monkeypatch.setenv("LDM_UNSAFE_CONFIG", "1")  # the opt-in: the config's own callable runs
    config.model.params.cond_stage_config = {"target": "collections.OrderedDict"}
    with pytest.raises(Exception) as error:  # instantiated (then rejected as a text encoder by the model)
        load_model_from_config(config)
    assert "LDM_UNSAFE_CONFIG" not in str(error.value)


def prompts_csv(path, rows=2):
    pd.DataFrame({"prompt": ["a red moon", "a blue star"][:rows], "evaluation_seed": [1, 2][:rows],
                  "case_number": list(range(rows))}).to_csv(path, index=False)
    return path


def test_a_torn_image_is_regenerated_and_scoring_refuses_missing_or_torn_images(tmp_path):
    generate, classify = "eval-scripts/generate-images.py", "eval-scripts/imageclassify.py"
    csv = prompts_csv(tmp_path / "p.csv")
    flags = ["--prompts_path", csv, "--save_path", tmp_path / "images", "--num_samples", 2, "--ddim_steps", 2]
    assert call_script(generate, *flags).returncode == 0
    folder = tmp_path / "images" / "tiny-sd"
    whole = np.asarray(Image.open(folder / "1_0.png"))
    data = (folder / "1_0.png").read_bytes()
    (folder / "1_0.png").write_bytes(data[: len(data) // 2])  # a kill mid-write of a non-atomic writer
    (folder / "0_1.png").unlink()
    score = ["--folder_path", folder, "--prompts_path", csv, "--save_path", tmp_path / "scores.csv"]
    line = one_line_error(call_script(classify, *score))
    assert "1 images missing and 1 unreadable in 2 prompts" in line and "--allow_incomplete" in line
    listed = pd.read_csv(tmp_path / "scores_incomplete.csv")
    assert listed.set_index("case_number").loc[[0, 1], ["missing", "unreadable"]].values.tolist() == [[1, 0], [0, 1]]
    done = call_script(classify, *score, "--allow_incomplete")
    assert done.returncode == 0 and "warning:" in done.stderr
    done = call_script(generate, *flags)
    assert done.returncode == 0 and "2 images written" in done.stdout
    assert np.array_equal(np.asarray(Image.open(folder / "1_0.png")), whole)
    assert call_script(classify, *score).returncode == 0


@pytest.mark.parametrize("flags, message", [(["--batch_size", 0], "--batch_size must be >= 1"),
                                            (["--ddim_steps", 0], "--ddim_steps must be >= 1"),
                                            (["--num_samples", -3], "--num_samples must be >= 1"),
                                            (["--guidance_scale", -1], "--guidance_scale must be >= 0")])
def test_generation_values_are_checked_before_anything_is_written(flags, message, tmp_path):
    generate = "eval-scripts/generate-images.py"
    base = ["--prompts_path", prompts_csv(tmp_path / "p.csv", rows=1), "--save_path", tmp_path / "images"]
    assert message in one_line_error(call_script(generate, *base, *flags))
    assert not (tmp_path / "images").exists()  # nothing that would refuse the corrected rerun


@pytest.mark.parametrize("flags, message", [(["--concepts", "banana"], "tiny-sd does not know banana"),
                                            (["--num_samples", 0], "--num_samples must be >= 1"),
                                            (["--num_samples", -3], "--num_samples must be >= 1"),
                                            (["--methods", "esd-x,mace"], "unknown mace"),
                                            (["--methods", "esd-x", "--erase_args", "--lrr 3"],
                                             "unrecognized arguments: --lrr 3")])
def test_benchmark_values_are_checked_before_any_erase(flags, message, tmp_path):
    assert message in one_line_error(call_script("eval-scripts/benchmark.py", *flags, "--save_path", tmp_path))
    assert not any(models_dir().glob("bench-*"))


def test_an_interrupted_erase_is_named_with_the_command_that_resumes_it(tmp_path):
    done = call_script(ERASE, *TORN, "--run_name", "torn")
    assert done.returncode == 2 and "loss is" in done.stderr
    line = one_line_error(call_script("eval-scripts/generate-images.py", "--model_name", "torn", "--prompts_path",
                          prompts_csv(tmp_path / "p.csv", rows=1), "--save_path", tmp_path))
    assert "run 'torn' is incomplete" in line and "--run_name torn --resume" in line
    with pytest.raises(UsageError, match="is incomplete"):
        load_model("torn")


def test_a_resume_state_that_is_not_ours_is_refused_in_one_line():
    assert call_script(ERASE, *TORN, "--run_name", "pickled").returncode == 2
    state = partial_folder(models_dir() / "pickled") / RESUME_STATE
    torch.save({"payload": np.arange(3)}, state)  # a pickle that weights_only refuses
    line = one_line_error(call_script(ERASE, *TORN, "--run_name", "pickled", "--resume"))
    assert "is not a resumable state this project wrote" in line


def test_a_killed_then_finished_overwrite_leaves_no_partial_folder():
    assert call_script(ERASE, *FAST_ESD, "--run_name", "once").returncode == 0
    final = finish_run_dir(prepare_run_dir("once", overwrite=True))  # an empty rebuild renamed into place
    assert final == models_dir() / "once" and not partial_folder(final).exists()


def test_scripts_import_the_ldm_beside_them_not_another_clones(tmp_path):
    clone = tmp_path / "clone"
    for folder in ("ldm", "train-scripts"):
        shutil.copytree(REPO_ROOT / folder, clone / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (clone / "ldm" / "__init__.py").write_text("raise SystemExit('the second clone ldm')\n")
    done = subprocess.run([sys.executable, str(clone / "train-scripts" / "erase.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "the second clone ldm" in done.stderr


class Payload:
    """A pickle that runs ``touch marker`` when unpickled without ``weights_only``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


@pytest.mark.parametrize("script_path, argv", [
    ("train-scripts/erase.py", [*FAST_ESD, "--run_name", "evil"]),
    ("eval-scripts/generate-images.py", ["--num_samples", 1, "--ddim_steps", 1]),
    ("train-scripts/convertModels.py", ["--to", "safetensors"]),
])
def test_no_script_runs_code_from_a_pickled_checkpoint(script_path, argv, tmp_path):
    """Loaded as tensors only (unknown pickled classes become inert stand-ins) or refused in one line; the
    payload never runs."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": torch.load(TINY / "model.ckpt", weights_only=True)["state_dict"], "x": Payload(marker)},
               evil)
    extra = {"eval-scripts/generate-images.py": ["--prompts_path", prompts_csv(tmp_path / "p.csv", rows=1),
                                                 "--save_path", tmp_path / "out"],
             "train-scripts/convertModels.py": ["--save_path", tmp_path / "evil.safetensors"]}.get(script_path, [])
    done = call_script(script_path, *argv, *extra, "--config_path", TINY / "config.yaml", "--ckpt_path", evil)
    assert done.returncode == 0 or one_line_error(done)
    assert not marker.exists()


@pytest.mark.slow
def test_a_generation_killed_mid_run_leaves_only_whole_images_and_resumes(tmp_path):
    csv = tmp_path / "p.csv"
    pd.DataFrame({"prompt": [f"a red moon {i}" for i in range(12)], "evaluation_seed": range(12),
                  "case_number": range(12)}).to_csv(csv, index=False)
    flags = ["--prompts_path", csv, "--save_path", tmp_path / "images", "--num_samples", 2, "--ddim_steps", 10,
             "--batch_size", 2]
    folder = tmp_path / "images" / "tiny-sd"
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "eval-scripts/generate-images.py"), *map(str, flags)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1200):
        if process.poll() is not None or len(list(folder.glob("*.png"))) >= 6:
            break
        subprocess.run(["sleep", "0.05"])
    process.kill()
    process.wait()
    made = sorted(folder.glob("*.png"))
    assert 0 < len(made) < 24, len(made)
    for path in made:  # every image under its final name is whole (written beside, then renamed)
        Image.open(path).load()
    done = call_script("eval-scripts/generate-images.py", *flags)
    assert done.returncode == 0 and len(list(folder.glob("*.png"))) == 24
