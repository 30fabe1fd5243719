"""The docs' generated blocks match the code, and no page points outside the project."""
import importlib.util
import re

from ldm.paths import REPO_ROOT

spec = importlib.util.spec_from_file_location("docs_tool", REPO_ROOT / "bench" / "docs.py")
docs_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docs_tool)


def test_generated_blocks_are_current():
    assert not docs_tool.stale_pages(), "run python3 bench/docs.py --update"


def test_a_changed_default_makes_its_block_stale():
    page = (REPO_ROOT / "docs" / "methods" / "esd.md").read_text()
    edited = page.replace("| `--iterations` | `1000` |", "| `--iterations` | `999` |")
    assert edited != page and docs_tool.regenerate(edited) == page


def test_no_page_points_outside_the_project():
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
    outside = re.compile(r"METHODS\.md|\.\./shared|git checkout [0-9a-f]{7}")
    assert not [str(p.relative_to(REPO_ROOT)) for p in pages[1:] if outside.search(p.read_text())]
