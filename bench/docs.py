"""Regenerate the docs' generated blocks from the code, or check that they are current.

    python3 bench/docs.py --check      # exit 2 naming each stale block (a default-tier test runs this)
    python3 bench/docs.py --update     # rewrite them in place

A block is the text between ``<!-- settings: <method> -->`` and ``<!-- /settings -->`` in any page under
docs/: the method's flags with their paper (SD v1) and tiny-sd defaults, from its settings dataclass and
tiny-sd's config (the registry, ``ldm.erasure.methods``).
"""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

from ldm.cli import new_parser, run
from ldm.erasure import methods
from ldm.erasure.settings import model_config_defaults, settings_table
from ldm.paths import REPO_ROOT, TINY_SD_DIR
from ldm.util import UsageError, atomic_write_text, load_config

BLOCK = re.compile(r"(<!-- settings: (?P<method>[\w-]+) -->\n)(?P<body>.*?)(<!-- /settings -->)", re.S)


def method_settings_table(name):
    """The settings table of registered method ``name`` with tiny-sd's defaults."""
    method = methods.get(name)
    tiny = model_config_defaults(method.settings, load_config(TINY_SD_DIR / "config.yaml"), method.config_blocks)
    return settings_table(method.settings, method.fixed, {k: v for k, (v, _) in tiny.items()})


def regenerate(text):
    """``text`` with every settings block rewritten."""
    return BLOCK.sub(lambda m: f"{m[1]}{method_settings_table(m['method'])}\n{m[4]}", text)


def stale_pages(root=REPO_ROOT / "docs"):
    """``{page: regenerated text}`` of the pages whose blocks are not current."""
    pages = {}
    for page in sorted(Path(root).rglob("*.md")):
        text = page.read_text()
        if regenerate(text) != text:
            pages[page] = regenerate(text)
    return pages


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--update", action="store_true", help="rewrite stale blocks (default: only check)")
    parser.add_argument("--check", action="store_true", help="exit 2 when a block is stale")
    args = parser.parse_args(argv)
    stale = stale_pages()
    if args.update:
        for page, text in stale.items():
            atomic_write_text(page, text)
        print(f"{len(stale)} pages rewritten")
    elif stale:
        raise UsageError(f"generated blocks are stale in {', '.join(str(p.relative_to(REPO_ROOT)) for p in stale)}; "
                         "run python3 bench/docs.py --update")
    else:
        print("docs current")


if __name__ == "__main__":
    run(main)
