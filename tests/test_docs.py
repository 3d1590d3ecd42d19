"""The docs are in sync: the params reference is the schema's, and every relative link points at a file."""

import re

import pytest
from conftest import ROOT

from pipeline.tools.params_docs import reference_markdown

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_the_params_reference_is_in_sync_with_the_schema():
    assert (ROOT / "docs" / "params.md").read_text() == reference_markdown(), "run: python scripts/params_reference.py"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if not target.startswith(("http://", "https://")):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"


def test_every_stage_has_a_page_and_every_module_a_row_in_the_architecture():
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    for module in sorted((ROOT / "pipeline").glob("*.py")):
        if module.name not in ("__init__.py", "__main__.py"):
            assert f"`{module.name}`" in architecture, module.name
    for stage in ("prepare", "tokenize", "train", "evaluate", "sample", "report"):
        assert (ROOT / "docs" / "stages" / f"{stage}.md").is_file()
