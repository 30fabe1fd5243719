"""Prompt CSVs in the ESD format (``prompt``, ``evaluation_seed``, ``case_number``), validated up front, and
text files of one entry a line (templates, words)."""
from pathlib import Path

import pandas as pd

from ldm.paths import resolve_path
from ldm.util import UsageError

REQUIRED = ("prompt", "evaluation_seed", "case_number")
CASE_NUMBER_ALIASES = ("image_id",)  # COCO-30k's CSV names its rows by image_id


def read_lines(path, what="entry", flag=None):
    """The entries of a text file, one ``what`` a line (a relative path not found from here is read from the
    repository root); blank lines and ``#`` comments skipped. A missing file is one line naming ``flag``."""
    path = resolve_path(path)
    if not path.is_file():
        raise UsageError(f"{flag + ' file ' if flag else ''}'{path}' does not exist; give a text file with one {what} "
                         "a line")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _integer_column(df, column, path):
    values = pd.to_numeric(df[column], errors="coerce")
    bad = values.isna() | (values != values.round())
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise UsageError(f"prompts CSV '{path}': row {row + 2} column '{column}' is {df[column].iloc[row]!r}, "
                         "not an integer")
    return values.astype("int64")


def read_prompts(path, require_guidance=False, skip_empty=False):
    """Read and check an ESD prompt CSV; returns a DataFrame with integer ``case_number`` and
    ``evaluation_seed`` and non-empty string prompts (row numbers in errors count the header as 1).

    Rows with an empty prompt are an error, or are dropped with ``skip_empty`` (the I2P CSV has one).
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"prompts CSV '{path}' not found")
    try:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"prompt": str})
    except Exception as error:
        raise UsageError(f"prompts CSV '{path}' cannot be read ({error})") from None
    if "case_number" not in df:
        alias = next((a for a in CASE_NUMBER_ALIASES if a in df), None)
        if alias is not None:
            df["case_number"] = df[alias]
    required = REQUIRED + (("evaluation_guidance",) if require_guidance else ())
    missing = [c for c in required if c not in df]
    if missing:
        raise UsageError(f"prompts CSV '{path}' lacks column(s) {', '.join(missing)}; it has "
                         f"{', '.join(map(str, df.columns))}")
    if len(df) == 0:
        raise UsageError(f"prompts CSV '{path}' has no rows")
    prompts = df["prompt"].fillna("").astype(str)
    empty = prompts.str.strip() == ""
    if empty.any() and not skip_empty:
        row = int(empty.to_numpy().nonzero()[0][0])
        raise UsageError(f"prompts CSV '{path}': row {row + 2} column 'prompt' is empty; fill it in, or pass "
                         "--skip_empty_prompts to leave such rows out")
    df["prompt"] = prompts
    df = df[~empty.to_numpy()].reset_index(drop=True)
    if len(df) == 0:
        raise UsageError(f"prompts CSV '{path}' has no rows with a prompt")
    df["case_number"] = _integer_column(df, "case_number", path)
    df["evaluation_seed"] = _integer_column(df, "evaluation_seed", path)
    duplicated = df["case_number"].duplicated()
    if duplicated.any():
        row = int(duplicated.to_numpy().nonzero()[0][0])
        raise UsageError(f"prompts CSV '{path}': row {row + 2} repeats case_number {df['case_number'].iloc[row]}; "
                         "case numbers name the output files and must be unique")
    if "evaluation_guidance" in df:
        guidance = pd.to_numeric(df["evaluation_guidance"], errors="coerce")
        if guidance.isna().any():
            row = int(guidance.isna().to_numpy().nonzero()[0][0])
            raise UsageError(f"prompts CSV '{path}': row {row + 2} column 'evaluation_guidance' is not a number")
        df["evaluation_guidance"] = guidance
    return df
