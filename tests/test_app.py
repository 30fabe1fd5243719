"""The demo (app.py): gradio's own Python client drives Erase and Compare on a served page; a slow test opens
it in headless Chromium and saves the screenshot the README shows."""
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldm.demo import erase_command, parse_progress
from ldm.paths import EVALUATOR_PATH, REPO_ROOT, models_dir
from ldm.util import UsageError

from conftest import call_script, one_line_error

RUN = "test-app-esdx-circle"
MADE = "test-app-made-esdx-circle"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def made_run():
    """A run made by the train script (in this process) before the page starts, so the page lists it."""
    done = call_script("train-scripts/train-esd.py", "--prompt", "circle", "--iterations", 2, "--ddim_steps", 4,
                       "--run_name", MADE, "--no_diffusers", "--no_samples")
    assert done.returncode == 0, done.stderr
    yield MADE
    shutil.rmtree(models_dir() / MADE, ignore_errors=True)


@pytest.fixture(scope="module")
def served(made_run):
    """The page on a free local port (tiny-sd, the evaluator), and gradio's client for it."""
    pytest.importorskip("gradio")
    from gradio_client import Client

    from ldm.demo import ModelCache, build_app
    page = build_app(ModelCache("cpu"), EVALUATOR_PATH)
    port = free_port()
    page.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    page.close()
    shutil.rmtree(models_dir() / RUN, ignore_errors=True)


def test_progress_lines_are_read_from_tqdm():
    line = "erasing:  45%|####      | 90/200 [00:14<00:17,  6.40it/s, loss=0.0013]\rerasing:  46%|#"
    assert parse_progress(line) == ("erasing", 90, 200, 0.0013)
    assert parse_progress("drawing: 100%|##########| 64/64 [00:30<00:00,  2.1it/s]") == ("drawing", 64, 64, None)
    assert parse_progress("no bar here") is None


@pytest.fixture
def existing_run():
    """A folder already in the models folder, under a name an erase from the page must not take."""
    folder = models_dir() / "test-app-existing"
    folder.mkdir(exist_ok=True)
    (folder / "config.yaml").write_text("model: {}\n")
    yield folder.name
    shutil.rmtree(folder)


@pytest.mark.parametrize("method,concept,flags,message", [
    ("esd-x", "  ", {}, "type the concept"),
    ("mace", "moon", {}, "method 'mace' unknown; use one of: esd-x"),
    ("sepce", "moon", {"negative_guidance": 2.0}, "negative guidance is an ESD setting"),
    ("esd-x", "moon", {"run_name": "../x"}, "run name '../x'"),
    ("esd-x", "moon", {"run_name": "existing"}, "already exists"),
    ("esd-x", "moon", {"run_name": "existing", "overwrite": True}, "is not a run folder"),
])
def test_bad_erase_input_is_one_message(method, concept, flags, message, existing_run):
    if flags.get("run_name") == "existing":
        flags = {**flags, "run_name": existing_run}
    with pytest.raises(UsageError, match=message):
        erase_command(method, concept, **flags)


def test_client_compares_a_run_and_never_replaces_it(served, made_run):
    """The page on a run the train script made: Compare draws the base and the run with verdicts; an Erase into
    its name is refused before any script starts."""
    refuses_and_compares(served, made_run)


def refuses_and_compares(served, run):
    """An Erase into ``run``'s name is refused; Compare draws the base and ``run`` with verdicts."""
    status, *_ = served.predict("esd-x", "circle", run, 2, None, None, "", False, api_name="/erase")
    assert "already exists" in status  # never silently replaced
    base, edited, base_verdict, edited_verdict = served.predict("a red circle", 0, run, [], 7.5, 5,
                                                                api_name="/compare")
    assert Path(base).is_file() and Path(edited).is_file()
    assert base_verdict.startswith("object: ") and edited_verdict.startswith("object: ")
    _, _, message, _ = served.predict("", 0, run, [], 7.5, 5, api_name="/compare")
    assert "type a prompt" in message


@pytest.mark.slow  # the page's Erase runs the train script in a new process; Compare is in the default tier above
def test_client_erases_then_compares(served):
    # --image_size 32: x_t and the before/after samples drawn at half tiny-sd's size, a quarter of the work
    status, loss, samples, _ = served.predict("esd-x", "circle", RUN, 2, None, None, "--ddim_steps 4 --image_size 32",
                                              False, api_name="/erase")
    assert status.startswith("done") and (models_dir() / RUN / "trained-params.safetensors").is_file(), status
    assert Path(loss).is_file() and Path(samples).is_file()
    from ldm.loading import load_model
    assert load_model(RUN).config.run.iterations == 2  # the train script's own run folder
    refuses_and_compares(served, RUN)


def test_a_bad_erase_is_a_message_in_the_page(served):
    status, *_ = served.predict("esd-x", "", "", None, None, None, "", False, api_name="/erase")
    assert status.startswith("**error:**") and "type the concept" in status


@pytest.mark.slow
def test_page_renders_in_headless_chromium(tmp_path):
    """Start app.py as a user does and screenshot it (docs/app.png when UPDATE_SCREENSHOT=1)."""
    import os
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium)")
    port = free_port()
    server = subprocess.Popen([sys.executable, str(REPO_ROOT / "app.py"), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(1)
        shot = tmp_path / "app.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1280,900", "--virtual-time-budget=15000", f"--screenshot={shot}",
                        f"http://127.0.0.1:{port}/"], check=True, capture_output=True, timeout=120)
        from PIL import Image
        image = Image.open(shot)
        assert image.size == (1280, 900) and len(set(image.convert("L").getdata())) > 20  # drawn, not blank
        if os.environ.get("UPDATE_SCREENSHOT"):
            shutil.copyfile(shot, REPO_ROOT / "docs" / "app.png")
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_unticking_a_concept_restores_it_without_touching_the_run(tmp_path):
    """A two-concept CPE run: the cache's model with 'moon' off holds only circle's gates, built by
    restore_concept in a private folder; the run folder is unchanged."""
    from ldm.demo import ModelCache, run_concepts
    from ldm.loading import load_model
    name = "test-app-cpe-two"
    done = call_script("train-scripts/train-cpe.py", "--prompt", "moon,circle", "--seperator", ",", "--stages", 1,
                       "--iterations", 2, "--first_stage_factor", 1, "--run_name", name, "--overwrite", "--no_diffusers",
                       "--no_samples")
    try:
        assert done.returncode == 0, done.stderr
        before = load_model(name).sha256
        assert sorted(run_concepts(models_dir() / name)) == ["circle", "moon"]
        cache = ModelCache("cpu")
        both, circle_only = cache.get(name), cache.get(name, off=["moon"])
        assert circle_only is cache.get(name, off=["moon"])  # loaded once
        assert run_concepts(circle_only.folder) == ["circle"] and circle_only.folder.parent == cache.scratch
        assert load_model(name).sha256 == before and both.sha256 == before
    finally:
        shutil.rmtree(models_dir() / name, ignore_errors=True)


@pytest.mark.parametrize("flags,message", [(["--model_name", "no-such-model"], "no-such-model"),
                                           (["--port", "70000"], "not a port number")])
def test_app_bad_flags_are_one_line(flags, message):
    assert message in one_line_error(call_script("app.py", *flags))
