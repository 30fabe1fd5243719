"""Results as data: every measured table in the docs is a CSV under ``docs/results/`` with a small manifest
(``<name>.json``), and the Markdown between ``<!-- results: <name> -->`` and ``<!-- /results -->`` is rendered
from them; the settings tables between ``<!-- settings: <method> -->`` and ``<!-- /settings -->`` come from the
method registry; the leaderboard's figures are drawn from ``docs/results/leaderboard.csv`` by the functions
the benchmark draws its own with. ``bench/results.py`` checks and rewrites all three.

A manifest says how its figures were made: ``command`` (the commands, as a user types them), ``model`` and
``measured_identity`` (the model identity the figures were measured under, as their reports recorded it; null
where none was recorded), ``date`` (when the figures were
recorded), ``images`` (how many images each figure counts), and ``format``: ``template`` (``columns``: one
``[header, cell template, alignment]`` per column, ``{field}`` a CSV column, ``{? ... ?}`` shown only when its
fields are not empty, ``{? ... |text?}`` else ``text``), ``esd-sweep`` (rows as ``bench/esd_sweep.py --out`` writes
them), ``report`` (an erasure report's ``summary.csv``), ``leaderboard`` (as the benchmark writes
``leaderboard.csv``) or ``methods`` (the README's table of methods, with headline figures from the leaderboard).
A table on tiny-sd is stale when its figures were not measured under the shipped model's identity (today's, or the
whole-file identity the project used before, of the same files); the rendered caption says so, and only a rerun of
its command (``bench/results.py --rerun``) changes that.
"""
import json
import os
import re
from functools import lru_cache
from pathlib import Path

import pandas as pd

from ldm.erasure import methods
from ldm.erasure.report import format_summary
from ldm.erasure.settings import model_config_defaults, settings_table
from ldm.identity import compvis_identity
from ldm.leaderboard import leaderboard_markdown
from ldm.leaderboard_figures import FIGURES, save_figures
from ldm.paths import REPO_ROOT, TINY_SD_DIR, outputs_dir
from ldm.util import UsageError, atomic_write_text, file_sha256, json_sha256, load_config

RESULTS_DIR = REPO_ROOT / "docs" / "results"
RESULTS_BLOCK = re.compile(r"(<!-- results: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)
SETTINGS_BLOCK = re.compile(r"(<!-- settings: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /settings -->)", re.S)
MANIFEST_FIELDS = ("title", "format", "command", "model", "measured_identity", "date", "images")
FORMATS = ("template", "esd-sweep", "report", "leaderboard", "methods")
FIELD = re.compile(r"\{(\w+)\}")
OPTIONAL = re.compile(r"\{\?(.*?)(?:\|([^{}|?]*))?\?\}", re.S)
LEADERBOARD = "leaderboard"


def pages():
    """The Markdown pages that may hold generated blocks: the README and every page under docs/."""
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]


def table_names():
    """Every results table: the manifests under docs/results/."""
    return sorted(p.stem for p in RESULTS_DIR.glob("*.json"))


def load_manifest(name):
    path = RESULTS_DIR / f"{name}.json"
    if not path.is_file():
        raise UsageError(f"no results table '{name}' (docs/results/{name}.json); tables: {', '.join(table_names())}")
    return json.loads(path.read_text())


def read_table(name, manifest=None):
    """A table's CSV: as text, cell for cell, for a template; as numbers for the sweep and leaderboard formats."""
    manifest = manifest or load_manifest(name)
    path = RESULTS_DIR / f"{name}.csv"
    if manifest["format"] in ("template", "methods"):
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    return pd.read_csv(path)


@lru_cache(maxsize=1)
def shipped_identity():
    """The first 12 hex digits of the shipped tiny-sd's identity (checkpoint and config ``model:`` section)."""
    return compvis_identity(TINY_SD_DIR / "config.yaml", TINY_SD_DIR / "model.ckpt")["sha256"][:12]


# The shipped tiny-sd's identity as the project keyed results before 2026-12: the SHA-256 of its whole config file
# and checkpoint, as shipped then. Figures recorded under it were measured on these weights; it cannot be computed
# again, since the config's per-method default blocks (outside the ``model:`` section) have changed since.
FORMER_FILE_IDENTITY = "55e159394101"


def staleness(name, manifest=None):
    """Why a table's figures are not those of the shipped model (a sentence), or None when they are: measured
    under the shipped tiny-sd's identity, or under the earlier whole-file identity of the same files."""
    manifest = manifest or load_manifest(name)
    if not (RESULTS_DIR / f"{name}.csv").is_file():
        return "its CSV is missing"
    if manifest["format"] == "methods":  # its figures are the leaderboard's
        return staleness(LEADERBOARD)
    if manifest["model"] != "tiny-sd" or manifest["measured_identity"] in (shipped_identity(),
                                                                           FORMER_FILE_IDENTITY):
        return None
    if manifest["measured_identity"] is None:
        return "the model identity it was measured on was not recorded"
    return (f"measured on `{manifest['measured_identity']}`, not the shipped tiny-sd (`{shipped_identity()}`, "
            f"formerly keyed `{FORMER_FILE_IDENTITY}`)")


def fill(template, row):
    """``template`` with each ``{field}`` replaced by ``row[field]``; a ``{? ... ?}`` part only where all its
    fields are non-empty (``{? ... |text?}``: else ``text``)."""
    def optional(match):
        return fill(match[1], row) if all(str(row[f]) != "" for f in FIELD.findall(match[1])) else match[2] or ""
    return FIELD.sub(lambda m: str(row[m[1]]), OPTIONAL.sub(optional, template))


def template_markdown(manifest, table):
    columns = manifest["columns"]
    lines = ["| " + " | ".join(c[0] for c in columns) + " |",
             "| " + " | ".join(c[2] if len(c) > 2 else "---" for c in columns) + " |"]
    lines += ["| " + " | ".join(fill(c[1], row) for c in columns) + " |" for _, row in table.iterrows()]
    return "\n".join(lines)


def _flag_text(value):
    """A flag's value as given: 'default' where the run's sweep did not set it (merged files), 50 not 50.0."""
    if pd.isna(value):
        return "default"
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def sweep_keys(frame):
    """The report rows' stable keys; a sweep file from before the report wrote them gets them from the labels."""
    if "key" in frame:
        return frame["key"]
    found = frame.measure.str.extract(r"found, (\w+)$")[0]
    return pd.Series(["found_" + f if isinstance(f, str) else
                      "same_attribute" if g == "same attribute" and m.startswith("other ") else
                      "other_attribute:" + m.split()[0] if g == "other attributes" else ""
                      for f, g, m in zip(found, frame.group, frame.measure)], index=frame.index)


def sweep_markdown(frame):
    """One Markdown line per run of a sweep CSV (``bench/esd_sweep.py --out``): its flags, efficacy per set, the
    mean change of the attribute's other values and of each other attribute (points, 95% interval), each with
    its verdict, and the erase's seconds. Figures are read by the report's keys."""
    first = list(frame.columns).index("group")
    flag_columns = [c for c in frame.columns[2:first] if c != "fixed" or frame[c].nunique(dropna=False) > 1]
    frame = frame.assign(key=sweep_keys(frame))

    def cell(row, figure):
        if figure == "efficacy":
            text = f"{row.edited:.0%} [{row.edited_low:.0%}, {row.edited_high:.0%}]"
        else:
            text = f"{row.change_points:+.1f} [{row.change_low:+.1f}, {row.change_high:+.1f}]"
        return f"{text} {row.verdict}".strip()

    columns = ["found, alone", "found, with_others", "same attribute", "other attributes", "erase s"]
    lines = ["| concept | " + " | ".join(flag_columns + columns) + " |",
             "|" + " --- |" * (1 + len(flag_columns) + len(columns))]
    for (_, concept), rows in frame.groupby(["run", "concept"], sort=False):
        by_key = {r.key: r for r in rows.itertuples(index=False)}
        found = [cell(by_key[f"found_{s}"], "efficacy") if f"found_{s}" in by_key else ""
                 for s in ("alone", "with_others")]
        same = [cell(by_key["same_attribute"], "change")] if "same_attribute" in by_key else []
        other = [f"{r.key.split(':', 1)[1]} {cell(r, 'change')}" for r in rows.itertuples(index=False)
                 if r.key.startswith("other_attribute:")]
        flags = [_flag_text(rows.iloc[0][c]) for c in flag_columns]
        lines.append("| " + " | ".join([concept, *flags, *found, "; ".join(same), "; ".join(other),
                                        f"{rows.iloc[0].erase_seconds:.0f}"]) + " |")
    return "\n".join(lines)


def methods_markdown(table, board):
    """The README's table of methods: what each edits, whether a concept can be restored, and its headline
    figures on tiny-sd from the leaderboard (found and same-attribute change per concept, erase time)."""
    concepts = list(dict.fromkeys(board.concept))
    head = ["method", "edits", "restore"] + [f"'{c}': found, same attribute" for c in concepts] + ["erase", "page"]
    align = ["---"] * 3 + ["---:"] * (len(concepts) + 1) + ["---"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    for _, row in table.iterrows():
        rows = board[board.method == row.method].set_index("concept")
        figures = [f"{100 * rows.efficacy[c]:.1f}%, {rows.specificity_same[c]:+.1f}" if c in rows.index else "n/a"
                   for c in concepts]
        seconds = ("-".join(dict.fromkeys(f"{s:.0f}" for s in (rows.seconds.min(), rows.seconds.max()))) + " s"
                   if len(rows) else "n/a")  # the range over the concepts
        lines.append("| " + " | ".join([f"`{row.method}`", row.edits, row.restore, *figures, seconds,
                                        f"[{row.page_title}]({row.page})"]) + " |")
    return "\n".join(lines)


def caption(name, manifest, page):
    """One line under a table: its data file, where and when it was measured, and whether it is stale."""
    link = os.path.relpath(RESULTS_DIR / name, Path(page).parent)
    where = manifest["model"]
    if manifest["model"] == "tiny-sd":
        where += f" `{manifest['measured_identity']}`" if manifest["measured_identity"] else " (identity not recorded)"
    stale = staleness(name, manifest)
    state = f" **Stale**: {stale}." if stale else ""
    return (f"<sub>Data: [`{name}.csv`]({link}.csv), with its command, images and identities in [`{name}.json`]"
            f"({link}.json); measured on {where}, recorded {manifest['date']}.{state}</sub>")


def render(name, page):
    """The body of a results block for ``page``: the table rendered from its CSV, then its caption."""
    manifest = load_manifest(name)
    if manifest["format"] == "template":
        table = template_markdown(manifest, read_table(name, manifest))
    elif manifest["format"] == "esd-sweep":
        table = sweep_markdown(read_table(name, manifest))
    elif manifest["format"] == "report":
        table = format_summary(read_table(name, manifest))
    elif manifest["format"] == LEADERBOARD:
        table = leaderboard_markdown(read_table(name, manifest))
    else:
        table = methods_markdown(read_table(name, manifest), read_table(LEADERBOARD))
        name, manifest = LEADERBOARD, load_manifest(LEADERBOARD)
    return f"{table}\n\n{caption(name, manifest, page)}\n"


def settings_block(name):
    """The settings table of registered method ``name`` with tiny-sd's defaults."""
    method = methods.get(name)
    tiny = model_config_defaults(method.settings, load_config(TINY_SD_DIR / "config.yaml"), method.config_blocks)
    return settings_table(method.settings, method.fixed, {k: v for k, (v, _) in tiny.items()}) + "\n"


def regenerate(text, page):
    """``text`` (of ``page``) with every results and settings block rewritten."""
    known = {n for n in table_names() if (RESULTS_DIR / f"{n}.csv").is_file()}  # others are left for problems()
    text = RESULTS_BLOCK.sub(lambda m: f"{m[1]}{render(m['name'], page)}{m[4]}" if m["name"] in known else m[0], text)
    return SETTINGS_BLOCK.sub(lambda m: f"{m[1]}{settings_block(m['name'])}{m[4]}", text)


def stale_pages():
    """``{page: regenerated text}`` of the pages whose blocks are not current."""
    found = {}
    for page in pages():
        text = page.read_text()
        new = regenerate(text, page)
        if new != text:
            found[page] = new
    return found


def figures_title():
    manifest = load_manifest(LEADERBOARD)
    return f"{manifest['title']} (tiny-sd {manifest['measured_identity']}, recorded {manifest['date']})"


def figures_source_sha256():
    """The digest of what the leaderboard figures are drawn from: the CSV and their title."""
    return json_sha256({"csv": file_sha256(RESULTS_DIR / f"{LEADERBOARD}.csv"), "title": figures_title()})


def figures_current():
    """Whether the leaderboard figures under docs/results/ exist and were drawn from the CSV as it is."""
    stamp = RESULTS_DIR / f"{LEADERBOARD}.figures.sha256"
    return (stamp.is_file() and stamp.read_text().strip() == figures_source_sha256()
            and all((RESULTS_DIR / name).is_file() for name in FIGURES))


def draw_figures():
    """The leaderboard's figures from docs/results/leaderboard.csv, and the stamp of what they were drawn from."""
    paths = save_figures(read_table(LEADERBOARD), RESULTS_DIR, figures_title())
    atomic_write_text(RESULTS_DIR / f"{LEADERBOARD}.figures.sha256", figures_source_sha256() + "\n")
    return paths


def problems():
    """Everything that is not as ``bench/results.py --update`` would leave it, one sentence each."""
    found = [f"{p.relative_to(REPO_ROOT)}: a generated block is out of date" for p in stale_pages()]
    used = {m["name"] for p in pages() for m in RESULTS_BLOCK.finditer(p.read_text())}
    for name in table_names():
        manifest = load_manifest(name)
        missing = [f for f in (("title", "format") if manifest.get("format") == "methods" else MANIFEST_FIELDS)
                   if f not in manifest]
        if missing or manifest.get("format") not in FORMATS:
            found.append(f"docs/results/{name}.json: missing {', '.join(missing) or 'a known format'}")
        elif not (RESULTS_DIR / f"{name}.csv").is_file():
            found.append(f"docs/results/{name}.csv is missing")
        elif name not in used:
            found.append(f"docs/results/{name}.csv is shown on no page")
    found += [f"a page shows results table '{name}', which has no manifest"
              for name in sorted(used - set(table_names()))]
    if not figures_current():
        found.append("the leaderboard figures under docs/results/ were not drawn from leaderboard.csv as it is")
    return found


def collectable(manifest):
    """Whether a table's figures can be taken from what its commands write (sweep, report and leaderboard formats)."""
    return manifest["format"] in ("esd-sweep", "report", LEADERBOARD) and bool(manifest.get("source"))


def check_collectable(name):
    """The table's manifest; a one-line error for a table transcribed by hand, naming its commands."""
    manifest = load_manifest(name)
    if not collectable(manifest):
        raise UsageError(f"'{name}' is transcribed by hand from its commands' output, so it is not rerun here; run "
                         f"them yourself: {' ; '.join(manifest['command']) or '(none: a historical table)'}")
    return manifest


def source_path(source):
    """Where a manifest's ``source`` is: under ``outputs_dir()`` (``LDM_OUTPUTS_DIR``) for ``outputs/...``, as the
    scripts' default folders are, else under the repository."""
    parts = Path(source).parts
    return outputs_dir().joinpath(*parts[1:]) if parts[0] == "outputs" else REPO_ROOT / source


def collect(name, today):
    """After a rerun of its commands: the table's CSV from what they wrote (its manifest's ``source``), and its
    manifest's identity and date from the figures themselves. Only the sweep, report and leaderboard formats
    are collected; a template table is transcribed by hand (a one-line error says so)."""
    manifest = check_collectable(name)
    missing = [s for s in manifest["source"] if not source_path(s).is_file()]
    if missing:
        raise UsageError(f"'{name}': its commands wrote no {', '.join(missing)}")
    table = pd.concat([pd.read_csv(source_path(s)) for s in manifest["source"]], ignore_index=True)
    identities = set(table["base_sha256"].dropna().astype(str)) if "base_sha256" in table else {shipped_identity()}
    if len(identities) != 1:
        raise UsageError(f"'{name}': its figures come from several base models ({', '.join(sorted(identities))})")
    table.to_csv(RESULTS_DIR / f"{name}.csv", index=False)
    manifest.update(measured_identity=identities.pop()[:12], date=today)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest
