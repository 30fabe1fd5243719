"""What the local demo (``app.py``) does, without the page: erase by running the method's own train script,
list the saved runs with their settings and report figures, and draw a prompt with the base and an edited
model from the same start noise, with the tiny-sd evaluator's verdict.

Erasing runs ``train-scripts/erase.py --method <method>`` in a child process (any method of the registry,
``ldm.erasure.methods``), so a run from the page is saved exactly as the script saves it, and the page stays
free while it trains.
"""
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ldm.erasure import methods
from ldm.erasure.settings import setting_fields
from ldm.evaluator import classify, load_evaluator
from ldm.generate import generate, latent_shape, seeded_noise
from ldm.loading import CHECKPOINT_NAMES, load_model
from ldm.paths import REPO_ROOT, models_dir, outputs_dir
from ldm.runs import check_run_name, prepare_run_dir, read_run_config, restore_concept, term_concepts
from ldm.util import UsageError

# tqdm's line: "<desc>:  45%|####      | 90/200 [00:14<00:17,  6.40it/s, loss=0.0013]"
PROGRESS = re.compile(r"(?P<desc>[^\r\n|]*?):?\s+\d+%\|[^|]*\|\s*(?P<done>\d+)/(?P<total>\d+)[^\]]*?(?:loss=(?P<loss>[-+.\deE]+))?\]")


def default_run_name(method, concept):
    """``app-<method>-<concept>``, the concept's non-alphanumerics as ``_``."""
    return f"app-{method}-" + re.sub(r"[^A-Za-z0-9]+", "_", concept.strip()).strip("_")


def erase_command(method, concept, run_name=None, iterations=None, lr=None, negative_guidance=None, extra=(),
                  overwrite=False, model_flags=()):
    """The train-script command line for an erase from the page, every input checked (a UsageError names
    what is wrong); returns ``(args, run_name)``."""
    entry = methods.get(method)
    concept = (concept or "").strip()
    if not concept:
        raise UsageError("type the concept to erase (e.g. 'Van Gogh')")
    run_name = (run_name or "").strip() or default_run_name(method, concept)
    check_run_name(run_name)
    prepare_run_dir(run_name, overwrite=overwrite, check_only=True)  # never replaces a run unless asked
    for name, value in (("iterations", iterations), ("lr", lr)):
        if value is not None and not value > 0:
            raise UsageError(f"{name} must be positive, got {value}")
    if negative_guidance is not None and "negative_guidance" not in {f.name for f in setting_fields(entry.settings)}:
        raise UsageError(f"negative guidance is an ESD setting; {method} has none")
    args = ["train-scripts/erase.py", "--method", method, "--prompt", concept, "--run_name", run_name,
            "--no_diffusers", *model_flags]
    for flag, value in (("--iterations", iterations), ("--lr", lr), ("--negative_guidance", negative_guidance)):
        if value is not None:
            args += [flag, str(int(value) if flag == "--iterations" else value)]
    return [*args, *extra, *(["--overwrite"] if overwrite else [])], run_name


def parse_progress(text):
    """The last tqdm progress in ``text``: ``(desc, done, total, loss or None)``, or None."""
    found = None
    for match in PROGRESS.finditer(text):
        found = match
    if found is None:
        return None
    loss = found["loss"]
    return found["desc"].strip(), int(found["done"]), int(found["total"]), float(loss) if loss else None


def run_script_streaming(args, on_progress=None):
    """Run ``python3 <args>`` from the repository root, calling ``on_progress(desc, done, total, loss)`` on
    every tqdm update; returns ``(returncode, output)``."""
    child = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, bufsize=1)
    output, pending = [], ""
    while True:
        chunk = child.stdout.read(256)
        if not chunk:
            break
        output.append(chunk)
        pending = (pending + chunk)[-2000:]
        if on_progress is not None:
            progress = parse_progress(pending)
            if progress is not None:
                on_progress(*progress)
                pending = pending[-200:]
    return child.wait(), "".join(output)


def error_line(output):
    """The script's one-line ``error: ...`` (or its last line)."""
    lines = [line for line in re.split(r"[\r\n]+", output) if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    return (errors or lines or ["(no output)"])[-1]


def run_concepts(run_dir, run=None):
    """The concepts a run erased: its separable terms' concepts (SepCE, CPE), else its recorded prompt
    (``run``: its config's ``run:`` section, when already read)."""
    terms = list(term_concepts(run_dir))
    if terms:
        return terms
    prompt = (run if run is not None else read_run_config(run_dir).run).get("prompt")
    return [prompt] if prompt else []


def report_paths(outputs=None):
    """``{run name: its newest erasure report's summary.csv}`` under ``outputs`` (``erasure-report.py``'s
    folders and the benchmark's cells), found in one pass."""
    outputs = outputs or outputs_dir()
    found = [*outputs.glob("*/reports/*/summary.csv"), *outputs.glob("*/cells/*/erasure/reports/*/summary.csv")]
    newest = {}
    for path in sorted(found, key=lambda p: p.stat().st_mtime):
        newest[path.parent.name] = path
    return newest


def list_runs(root=None):
    """Every run under ``root``: name, method, concepts, the settings that matter, training time and, when
    an erasure report exists, its efficacy and same-attribute figures."""
    reports, rows = report_paths(), []
    for folder in sorted(p for p in Path(root or models_dir()).iterdir() if p.is_dir() and not p.name.startswith(".")):
        config = read_run_config(folder)
        if config is None:
            continue
        run = config.run
        row = {"run": folder.name, "method": methods.method_of_run(config).name,
               "concepts": ", ".join(run_concepts(folder, run)), "iterations": run.get("iterations"), "lr": run.get("lr")}
        training = folder / "training.json"
        if training.is_file():
            row["seconds"] = json.loads(training.read_text()).get("training_seconds_this_process")
        if folder.name in reports:
            report = pd.read_csv(reports[folder.name])
            keys = report["key"] if "key" in report else pd.Series("", index=report.index)  # older reports: none
            found, same = report[keys == "found_combined"], report[keys == "same_attribute"]
            if len(found):
                row["found"] = f"{100 * found.edited.iloc[0]:.1f}% [{100 * found.edited_low.iloc[0]:.0f}, " \
                               f"{100 * found.edited_high.iloc[0]:.0f}]"
            if len(same):
                row["same attribute"] = f"{same.change_points.iloc[0]:+.1f} ({same.verdict.iloc[0]})"
        rows.append(row)
    return pd.DataFrame(rows, columns=["run", "method", "concepts", "iterations", "lr", "seconds", "found",
                                       "same attribute"])


class ModelCache:
    """Loaded models by name (and, for a run with separable terms, by the concepts kept on), loaded once.
    Turning a concept off uses ``restore_concept``, the same call as ``train-scripts/restore-concept.py``,
    into a private temporary folder."""

    def __init__(self, device="cpu", base_flags=None):
        self.device, self.base_flags, self.models = device, base_flags or {}, {}
        self.scratch = Path(tempfile.mkdtemp(prefix="demo-runs-"))

    def base(self):
        """The base model the page erases from (tiny-sd unless a config and checkpoint were given)."""
        return self.get(None)

    def get(self, name, off=()):
        """The model ``name`` (None: the base) with the separable terms of ``off`` dropped."""
        key = (name, tuple(sorted(off)))
        if key not in self.models:
            if name is None:
                loaded = load_model(self.base_flags.get("model_name"), self.base_flags.get("config_path"),
                                    self.base_flags.get("ckpt_path"), device=self.device)
            elif off:
                folder = models_dir() / name
                for i, concept in enumerate(sorted(off)):
                    restored = f"{name}-off{i}"
                    restore_concept(folder, concept, restored, overwrite=True, root=self.scratch)
                    folder = self.scratch / restored
                loaded = load_model(str(folder), device=self.device)
            else:
                loaded = load_model(name, device=self.device)
            self.models[key] = loaded
        return self.models[key]


def base_model_flags(loaded, base_flags):
    """The train scripts' ``--config_path``/``--ckpt_path`` for the base the page shows (None for a run: the
    scripts erase from a CompVis model). ``base_flags``: what the page was started with."""
    if loaded.kind != "compvis":
        return None
    if base_flags.get("config_path"):
        return ["--config_path", str(base_flags["config_path"]), "--ckpt_path", str(base_flags["ckpt_path"])]
    ckpt = next(loaded.folder / n for n in CHECKPOINT_NAMES if (loaded.folder / n).is_file())  # under models/
    return ["--config_path", str(loaded.folder / "config.yaml"), "--ckpt_path", str(ckpt)]


def verdict(evaluator, image):
    """The tiny-sd evaluator's reading of one uint8 image: ``object: moon 0.97 · color: red 0.91 · ...``."""
    found = classify(evaluator, image[None])
    return " · ".join(f"{head}: {names[0]} {probs[0].max():.2f}" for head, (names, probs) in found.items())


def draw_pair(base, edited, prompt, seed=0, guidance_scale=7.5, ddim_steps=50):
    """The base's and the edited model's image of ``prompt`` from the same start noise (uint8 arrays)."""
    if not (prompt or "").strip():
        raise UsageError("type a prompt to draw")
    x_T = seeded_noise([int(seed)], latent_shape(base))
    return (generate(base, [prompt], x_T, guidance_scale, int(ddim_steps))[0],
            generate(edited, [prompt], x_T, guidance_scale, int(ddim_steps))[0])


def as_image(array):
    """A uint8 array as a PIL image (what the page shows)."""
    return Image.fromarray(np.asarray(array))


def method_hints():
    """One line per registered method: its description and its own flags (``erase.py --method M --help``)."""
    shown = {"prompt", "iterations", "lr", "negative_guidance", "seed"}  # the page's own fields
    return [f"**{m.name}**: {m.description}; " + ", ".join(
        f"--{f.name}" for f in setting_fields(m.settings) if f.metadata["flag"] and f.name not in shown | set(m.fixed))
        for m in methods.REGISTRY]


def build_app(cache, evaluator_path=None):
    """The demo page (gradio Blocks): Erase, Compare, Runs. ``cache`` is a ``ModelCache``; ``evaluator_path``
    the tiny-sd evaluator (None: no verdicts)."""
    import shlex

    import gradio as gr

    evaluator = load_evaluator(evaluator_path, cache.device) if evaluator_path else None
    model_flags = base_model_flags(cache.base(), cache.base_flags)

    def run_names():
        return list_runs()["run"].tolist()

    def erase(method, concept, run_name, iterations, lr, negative_guidance, extra, overwrite,
              progress=gr.Progress()):
        try:
            if model_flags is None:
                raise UsageError(f"the base '{cache.base().name}' is a run: the train scripts erase from a CompVis "
                                 "model; start the page with that model (--model_name, or --config_path/--ckpt_path)")
            args, name = erase_command(method, concept, run_name, iterations or None, lr or None,
                                       negative_guidance or None, shlex.split(extra or ""), overwrite, model_flags)
        except (UsageError, ValueError) as error:
            yield f"**error:** {error}", None, None, gr.update()
            return
        yield f"erasing '{concept.strip()}' with {method} into `models/{name}` ...", None, None, gr.update()

        def on_progress(desc, done, total, loss):
            progress((done, total), desc=f"{desc}" + (f" (loss {loss:.4g})" if loss is not None else ""))
        code, output = run_script_streaming(args, on_progress)
        if code != 0:
            yield f"**{error_line(output)}**", None, None, gr.update()
            return
        folder = models_dir() / name
        loss, samples = folder / "loss.png", folder / "samples.png"
        yield (f"done: run saved to `models/{name}` (as `{shlex.join(args)}` saves it)",
               str(loss) if loss.is_file() else None, str(samples) if samples.is_file() else None,
               gr.update(choices=run_names(), value=name))

    def concepts_of(name):
        if not name:
            return gr.update(choices=[], value=[], visible=False)
        concepts = list(term_concepts(models_dir() / name))  # only separate terms can be switched off
        return gr.update(choices=concepts, value=concepts, visible=bool(concepts))

    def compare(prompt, seed, name, on, guidance_scale, ddim_steps):
        try:
            if not name:
                raise UsageError("pick an edited model (a run) to compare with the base")
            off = [c for c in term_concepts(models_dir() / name) if c not in (on or [])]
            base, edited = cache.base().model, cache.get(name, off).model
            before, after = draw_pair(base, edited, prompt, seed, guidance_scale, ddim_steps)
        except UsageError as error:
            return None, None, f"**error:** {error}", ""
        if evaluator is None:
            return as_image(before), as_image(after), "no evaluator for this base", ""
        return as_image(before), as_image(after), verdict(evaluator, before), verdict(evaluator, after)

    with gr.Blocks(title="Concept erasure") as page:
        gr.Markdown("# Concept erasure\nErase a concept from the model's weights, compare with the base, "
                    "and manage the saved runs (`models/<run>/`, the train scripts' own folders).")
        with gr.Tabs() as tabs:
            with gr.Tab("Erase", id="erase"):
                with gr.Row():
                    method = gr.Dropdown(list(methods.METHODS), value=methods.REGISTRY[0].name, label="method")
                    concept = gr.Textbox(label="concept", placeholder="Van Gogh")
                    run_name = gr.Textbox(label="run name", placeholder="default: app-<method>-<concept>")
                with gr.Row():
                    iterations = gr.Number(None, label="iterations (0: the method's default)", precision=0)
                    lr = gr.Number(None, label="learning rate (0: the method's default)")
                    negative_guidance = gr.Number(None, label="negative guidance, ESD (0: its default)")
                with gr.Accordion("method-specific settings", open=False):
                    gr.Markdown("\n".join(f"- {hint}" for hint in method_hints()))
                    extra = gr.Textbox(label="more flags for the train script", placeholder="--l1_weight 2e-5")
                    overwrite = gr.Checkbox(label="replace a run of the same name", value=False)
                erase_button = gr.Button("Erase", variant="primary")
                status = gr.Markdown()
                with gr.Row():
                    loss_plot = gr.Image(label="loss", type="filepath")
                    samples = gr.Image(label="before / after", type="filepath")
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    prompt = gr.Textbox(label="prompt", value="a red moon")
                    seed = gr.Number(label="seed", value=0, precision=0)
                    edited_name = gr.Dropdown(run_names(), label="edited model (a run)", allow_custom_value=False)
                concepts_on = gr.CheckboxGroup([], label="erased concepts switched on (SepCE, CPE: untick to restore)",
                                               visible=False)
                with gr.Row():
                    guidance = gr.Slider(1, 15, value=7.5, step=0.5, label="guidance scale")
                    steps = gr.Slider(5, 100, value=50, step=1, label="DDIM steps")
                compare_button = gr.Button("Draw both", variant="primary")
                with gr.Row():
                    with gr.Column():
                        base_image = gr.Image(label="base", type="pil")
                        base_verdict = gr.Markdown()
                    with gr.Column():
                        edited_image = gr.Image(label="edited", type="pil")
                        edited_verdict = gr.Markdown()
            with gr.Tab("Runs", id="runs"):
                runs_table = gr.Dataframe(list_runs(), interactive=False)
                with gr.Row():
                    refresh = gr.Button("Refresh")
                    chosen = gr.Dropdown(run_names(), label="run")
                    load = gr.Button("Load into Compare")

        erase_button.click(erase, [method, concept, run_name, iterations, lr, negative_guidance, extra, overwrite],
                           [status, loss_plot, samples, edited_name], api_name="erase", concurrency_limit=1,
                           concurrency_id="erase")
        edited_name.change(concepts_of, edited_name, concepts_on)
        compare_button.click(compare, [prompt, seed, edited_name, concepts_on, guidance, steps],
                             [base_image, edited_image, base_verdict, edited_verdict], api_name="compare",
                             concurrency_limit=1, concurrency_id="compare")
        refresh.click(lambda: (list_runs(), gr.update(choices=run_names())), None, [runs_table, chosen],
                      api_name="runs")
        load.click(lambda name: (gr.update(choices=run_names(), value=name), gr.Tabs(selected="compare")),
                   chosen, [edited_name, tabs])
    return page
