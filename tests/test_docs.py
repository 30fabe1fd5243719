"""The docs are the project's own: every generated part matches its source (settings tables the registry, measured
tables their CSVs under docs/results/, the leaderboard figures leaderboard.csv), every command they print parses as
written, and nothing points outside the project."""
import contextlib
import importlib.util
import io
import json
import re
import shlex
import shutil
import subprocess

import pytest

from ldm import results
from ldm.paths import REPO_ROOT
from ldm.util import UsageError

PAGES = results.pages()
SCRIPTS = {}


def script(path):
    """A script's module, loaded by path once (its ``main(argv)`` runs in-process)."""
    if path not in SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"docs_script_{len(SCRIPTS)}", REPO_ROOT / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        SCRIPTS[path] = module
    return SCRIPTS[path]


def test_generated_parts_are_current():
    assert results.problems() == [], "run python3 bench/results.py --update"


def test_results_check_passes_and_names_the_stale_tables(capsys):
    tool = script("bench/results.py")
    tool.main(["--check"])
    assert "docs current" in capsys.readouterr().out
    tool.main(["--stale"])
    stale = capsys.readouterr().out
    assert "esd-sweep-oat: measured on `dba05233a5b2`" in stale  # an earlier tiny-sd
    assert "leaderboard" not in stale  # measured on the shipped files (under their earlier whole-file identity)
    assert "tiny-sd-versions" not in stale  # a historical table is never stale


def test_a_changed_default_makes_its_settings_block_stale():
    page = REPO_ROOT / "docs" / "methods" / "esd.md"
    text = page.read_text()
    edited = text.replace("| `--iterations` | `1000` |", "| `--iterations` | `999` |")
    assert edited != text and results.regenerate(edited, page) == text


@pytest.fixture
def results_copy(tmp_path, monkeypatch):
    """docs/results/ copied to a temporary folder that the results module reads instead."""
    copy = tmp_path / "results"
    shutil.copytree(results.RESULTS_DIR, copy)
    monkeypatch.setattr(results, "RESULTS_DIR", copy)
    return copy


@pytest.mark.parametrize("name, old, new, page", [
    ("esd-defaults", ",-13.8,", ",-13.9,", "docs/methods/esd.md"),  # a sweep table (Seurat's colors)
    ("cie-sepce-defaults", ",-36.1,", ",-36.2,", "docs/methods/cie-sepce.md"),  # a template table (CiE, Pollock)
    ("leaderboard", "0.075", "0.085", "docs/benchmark.md"),  # the leaderboard (CPE on the moon alone, 7.5%)
])
def test_a_changed_figure_in_a_csv_makes_its_page_stale(results_copy, name, old, new, page):
    csv = results_copy / f"{name}.csv"
    text = csv.read_text()
    assert old in text
    csv.write_text(text.replace(old, new, 1))
    stale = results.stale_pages()
    assert REPO_ROOT / page in stale
    shown = {",-13.9,": "-13.9", ",-36.2,": "-36.2", "0.085": "8.5%"}[new]
    assert shown in stale[REPO_ROOT / page] and shown not in (REPO_ROOT / page).read_text()
    if name == "leaderboard":
        assert not results.figures_current() and REPO_ROOT / "README.md" in stale  # the README's methods table too


def test_a_table_says_when_it_is_stale(results_copy):
    manifest = json.loads((results_copy / "cpe-authors-settings.json").read_text())
    other = {**manifest, "measured_identity": "0" * 12}
    assert "Stale" in results.caption("cpe-authors-settings", other, REPO_ROOT / "docs" / "x.md")
    assert "measured on `000000000000`" in results.staleness("cpe-authors-settings", other)
    assert "not recorded" in results.staleness("cpe-authors-settings", {**manifest, "measured_identity": None})
    for identity in (results.shipped_identity(), results.FORMER_FILE_IDENTITY):  # today's key, or the earlier one
        current = {**manifest, "measured_identity": identity}
        assert results.staleness("cpe-authors-settings", current) is None
        assert "Stale" not in results.caption("cpe-authors-settings", current, REPO_ROOT / "docs" / "x.md")
    (results_copy / "cpe-authors-settings.csv").unlink()
    assert "docs/results/cpe-authors-settings.csv is missing" in results.problems()


def test_every_table_has_a_complete_manifest_and_is_shown():
    names = results.table_names()
    assert len(names) >= 20
    for name in names:
        manifest = results.load_manifest(name)
        if manifest["format"] != "methods":
            assert set(results.MANIFEST_FIELDS) <= set(manifest), name
            assert manifest["command"] or "not reproducible" in manifest["note"], name


def commands(text):
    """Every command a page prints: the lines of its bash blocks (continuations joined, comments dropped) and
    its inline code spans that run a script, each as (script path, arguments)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += block.replace("\\\n", " ").splitlines()
    spans = re.findall(r"`((?:python3|torchrun|srun) [^`]*?\.py[^`]*)`", text, re.S)
    lines += [" ".join(span.split()) for span in spans]
    found = []
    for line in lines:
        tokens = shlex.split(line, comments=True)
        scripts = [i for i, t in enumerate(tokens) if t.endswith(".py")]
        if scripts:
            found.append((tokens[scripts[0]], tokens[scripts[0] + 1:]))
    return found


def all_commands():
    found = {}
    for page in PAGES:
        for path, args in commands(page.read_text()):
            found.setdefault((path, shlex.join(args)), str(page.relative_to(REPO_ROOT)))
    for name in results.table_names():
        for command in results.load_manifest(name).get("command", []):
            for path, args in commands(f"```bash\n{command}\n```"):
                found.setdefault((path, shlex.join(args)), f"docs/results/{name}.json")
    return found


def test_the_readme_shows_every_step_and_is_short():
    text = (REPO_ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    scripts = {path for path, _ in commands(text)}
    assert {"train-scripts/erase.py", "eval-scripts/generate-images.py", "eval-scripts/erasure-report.py",
            "eval-scripts/attack.py", "eval-scripts/benchmark.py", "eval-scripts/sample-grid.py"} <= scripts
    assert "docs/results/leaderboard.png" in text


def check_parses(path, argv):
    """``path`` takes every flag of ``argv``, with values of the right kind: ``--help`` after them exits 0 (a bad
    choice or number before it is an error), and the help names every flag."""
    assert (REPO_ROOT / path).is_file(), f"{path} does not exist"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        script(path).main([*argv, "--help"])
    assert exit_.value.code == 0, f"{path} {shlex.join(argv)}"
    flags = {a.split("=")[0] for a in argv if re.fullmatch(r"--[\w-]+(=\S*)?", a)}
    unknown = [f for f in flags if not re.search(re.escape(f) + r"\b", out.getvalue())]
    assert not unknown, f"{path} has no {unknown}"


@pytest.mark.parametrize("command", sorted(all_commands()), ids=lambda c: f"{c[0]} {c[1]}"[:90])
def test_every_command_in_the_docs_parses(command):
    path, args = command
    argv = shlex.split(args)
    check_parses(path, argv)
    if path == "bench/esd_sweep.py":  # the sweep hands its --fixed and --grid flags to the ESD erase
        passed = [t for i, a in enumerate(argv) if i and argv[i - 1] == "--fixed" for t in shlex.split(a)]
        for i, entry in enumerate(argv):
            if i and argv[i - 1] == "--grid":
                name, _, values = entry.partition("=")
                passed += [x for value in values.split(",") for x in (f"--{name}", value)]
        check_parses("train-scripts/train-esd.py", passed)


OUTSIDE = re.compile("|".join([r"METHODS\.md", r"\.\./shared", r"parent / \"shared\"", r"git checkout",
                               r"\bcommit [0-9a-f]{7,40}\b", r"\bissues?\b"]), re.I)


def test_no_page_points_outside_the_project():
    texts = {p: p.read_text() for p in PAGES}
    texts.update({p: p.read_text() for p in sorted(results.RESULTS_DIR.glob("*.json"))})
    assert not [f"{p.relative_to(REPO_ROOT)}: {m[0]}" for p, t in texts.items() for m in OUTSIDE.finditer(t)]
    def headings(path):  # GitHub's anchors: lower case, punctuation dropped, spaces as hyphens
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.*)$", path.read_text(), re.M)}

    broken = []
    for page in PAGES:
        for target, fragment, src in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)|src=\"([^\"]+)\"", page.read_text()):
            target = target or src
            if target.startswith(("http://", "https://")):
                continue
            resolved = (page.parent / target).resolve() if target else page
            if REPO_ROOT.resolve() not in resolved.parents or not resolved.exists() or (
                    fragment and fragment not in headings(resolved)):
                broken.append(f"{page.relative_to(REPO_ROOT)}: {target}#{fragment}")
    assert not broken, broken


def test_no_file_in_the_repository_points_outside_the_project():
    """Every text file of the checkout: no reference to files outside it, commits to check out, or issues."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True,
                                text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    skip = ("models/clip-tokenizer/", "tests/test_docs.py")
    shared_data = ("tests/conftest.py", "tests/test_concept_world.py")  # checks on reference data that skip without it
    offenders = []
    for name in listed:
        path = REPO_ROOT / name
        if name.startswith(skip) or not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        offenders += [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m[0]}" for m in OUTSIDE.finditer(text)
                      if not (name in shared_data and "shared" in m[0])]
    assert not offenders, offenders


def test_rerun_refuses_a_table_transcribed_by_hand():
    with pytest.raises(UsageError, match="transcribed by hand"):
        script("bench/results.py").main(["--rerun", "cie-sepce-defaults"])
