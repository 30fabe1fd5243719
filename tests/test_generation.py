"""generate-images.py: naming, batch-size invariance, resume, validation before loading, diffusers."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.generate import sample_noise

from conftest import REPO_ROOT, call_script, one_line_error

CSV = "prompt,evaluation_seed,case_number\na red star,11,0\na painting by Seurat,12,3\na blue moon,13,7\n"


@pytest.fixture(scope="module")
def prompts_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.csv"
    path.write_text(CSV)
    return path


def _generate(small_config_path, small_ckpt, prompts_csv, save_path, *extra):
    return call_script("eval-scripts/generate-images.py", "--ckpt_path", small_ckpt, "--config_path",
                      small_config_path, "--prompts_path", prompts_csv, "--save_path", save_path, "--model_name", "m",
                      "--num_samples", 2, "--ddim_steps", 3, "--device", "cpu", *extra)


def _pixels(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_noise_is_esds_per_row_draw():
    torch.manual_seed(1234)
    esd = torch.randn((10, 4, 8, 8))  # ESD: torch.manual_seed(seed); randn((num_samples, ...))
    assert torch.equal(sample_noise(1234, 10, (4, 8, 8))[7], esd[7])


def test_images_are_named_and_independent_of_batch_size(small_config_path, small_ckpt, prompts_csv, tmp_path):
    first = _generate(small_config_path, small_ckpt, prompts_csv, tmp_path / "a", "--batch_size", 4)
    assert first.returncode == 0, first.stderr
    second = _generate(small_config_path, small_ckpt, prompts_csv, tmp_path / "b", "--batch_size", 1)
    assert second.returncode == 0, second.stderr
    a, b = _pixels(tmp_path / "a" / "m"), _pixels(tmp_path / "b" / "m")
    assert sorted(a) == ["0_0.png", "0_1.png", "3_0.png", "3_1.png", "7_0.png", "7_1.png"]
    # same noise per image; CPU kernels block differently per batch size, so a rare pixel may round
    # to the neighbouring level
    for name in a:
        diff = np.abs(a[name].astype(int) - b[name].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, name
    assert not np.array_equal(a["0_0.png"], a["0_1.png"])  # same prompt, other noise
    assert a["0_0.png"].shape == (64, 64, 3)


def test_rerun_resumes_and_refuses_other_settings(small_config_path, small_ckpt, prompts_csv, tmp_path):
    out = tmp_path / "m"
    assert _generate(small_config_path, small_ckpt, prompts_csv, tmp_path).returncode == 0
    (out / "3_1.png").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    result = _generate(small_config_path, small_ckpt, prompts_csv, tmp_path)
    assert result.returncode == 0 and "1 images written, 5 already there" in result.stdout
    assert all(out.joinpath(name).stat().st_mtime_ns == t for name, t in kept.items())
    assert "made with other settings (guidance_scale differ)" in one_line_error(
        _generate(small_config_path, small_ckpt, prompts_csv, tmp_path, "--guidance_scale", 3))
    ranged = _generate(small_config_path, small_ckpt, prompts_csv, tmp_path / "r", "--from_case", 3,
                       "--till_case", 3)
    assert ranged.returncode == 0 and sorted(_pixels(tmp_path / "r" / "m")) == ["3_0.png", "3_1.png"]


def test_bad_csv_fails_before_any_model_loads(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,seed,case_number\na star,1,0\n")
    result = call_script("eval-scripts/generate-images.py", "--prompts_path", bad, "--ckpt_path",
                        tmp_path / "absent.ckpt", "--config_path", tmp_path / "absent.yaml", "--save_path", tmp_path)
    assert "lacks column(s) evaluation_seed" in one_line_error(result)
    assert list(tmp_path.iterdir()) == [bad]


def test_diffusers_folder_generates_the_same_images(small_model, small_config, small_config_path, small_ckpt,
                                                    prompts_csv, tmp_path):
    from ldm.convert import save_diffusers
    pipeline = save_diffusers(small_model, small_config, tmp_path / "pipe")
    compvis = _generate(small_config_path, small_ckpt, prompts_csv, tmp_path / "c")
    diffusers = call_script("eval-scripts/generate-images.py", "--diffusers_path", pipeline, "--prompts_path",
                           prompts_csv, "--save_path", tmp_path / "d", "--model_name", "m", "--num_samples", 2,
                           "--ddim_steps", 3, "--device", "cpu")
    assert compvis.returncode == 0 and diffusers.returncode == 0, diffusers.stderr
    c, d = _pixels(tmp_path / "c" / "m"), _pixels(tmp_path / "d" / "m")
    assert sorted(c) == sorted(d)
    assert max(np.abs(c[k].astype(int) - d[k].astype(int)).max() for k in c) <= 2


def test_batches_split_across_ranks_without_overlap_or_gap():
    from ldm.text2image import Job, plan_batches
    jobs = [Job(case, i, f"p{case}", case, 7.5 if case % 3 else 3.0) for case in range(7) for i in range(3)]
    plan = plan_batches(jobs, batch_size=4)
    assert all(len({j.guidance_scale for j in batch}) == 1 for batch in plan)
    for world in (1, 2, 3, 5):
        shares = [[job for k, batch in enumerate(plan) if k % world == rank for job in batch] for rank in range(world)]
        flat = [job for share in shares for job in share]
        assert sorted(flat, key=jobs.index) == jobs and len(set(flat)) == len(jobs)


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_byte_for_byte(small_config_path, small_ckpt, prompts_csv, tmp_path):
    import os
    import subprocess
    import sys
    args = ["--ckpt_path", small_ckpt, "--config_path", small_config_path, "--prompts_path", prompts_csv,
            "--model_name", "m", "--num_samples", 2, "--ddim_steps", 3, "--device", "cpu", "--batch_size", 2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's per-process default, for identical kernels
    single = subprocess.run([sys.executable, str(REPO_ROOT / "eval-scripts/generate-images.py"), *map(str, args),
                             "--save_path", str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr

    def sharded():
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(REPO_ROOT / "eval-scripts/generate-images.py"), *map(str, args),
                               "--save_path", str(tmp_path / "two")], capture_output=True, text=True, env=env,
                              cwd=REPO_ROOT, timeout=600)
    result = sharded()
    assert result.returncode == 0, result.stderr
    # 3 batches of 2: rank 0 makes batches 0 and 2, rank 1 batch 1
    assert "rank 0 of 2: 4 images written" in result.stdout and "rank 1 of 2: 2 images written" in result.stdout
    one, two = tmp_path / "one" / "m", tmp_path / "two" / "m"
    names = sorted(p.name for p in one.glob("*.png"))
    assert names == sorted(p.name for p in two.glob("*.png")) and len(names) == 6
    assert all((one / n).read_bytes() == (two / n).read_bytes() for n in names)
    assert (two / "generation.json").is_file()  # written once, by rank 0

    (two / "3_1.png").unlink()  # rank 1's image: a rerun makes exactly it, with the same bytes
    again = sharded()
    assert "rank 0 of 2: 0 images written, 4 already there" in again.stdout
    assert "rank 1 of 2: 1 images written, 1 already there" in again.stdout
    assert (two / "3_1.png").read_bytes() == (one / "3_1.png").read_bytes()
