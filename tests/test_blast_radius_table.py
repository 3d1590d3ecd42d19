"""docs/architecture.md's "What an edit reruns" table against the code: for every ground module and every params
section's schema module, the stages whose code (their import closure, as dvc.yaml declares it) holds the file.
tests/test_dvc.py's blast-radius test makes the same edits through real DVC for a chosen set of them."""

import re

from conftest import ROOT

from pipeline.tools.dvc_yaml import STAGES, stage_code

HEADING = "## What an edit reruns"
ROW = re.compile(r"^\| `([^`]+)` \| ([^|]+) \|$")


def computed() -> dict[str, str]:
    code = {name: set(stage_code(stage["package"], ROOT)) for name, stage in STAGES.items()}
    modules = sorted(
        [str(p.relative_to(ROOT)) for p in (ROOT / "pipeline").glob("*.py") if p.name not in ("__init__.py", "__main__.py", "cli.py")]
        + [str(p.relative_to(ROOT)) for p in (ROOT / "pipeline" / "config").glob("*.py") if p.name != "__init__.py"]
        + ["pipeline/tools/params_docs.py"]
    )
    return {m.removeprefix("pipeline/"): ", ".join(s for s in STAGES if m in code[s]) or "none" for m in modules}


def documented() -> dict[str, str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert HEADING in text, f"docs/architecture.md has no {HEADING!r} section"
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2).strip() for line in section.splitlines() if (m := ROW.match(line))}


def table() -> str:
    """The rows as they should read (print it to update the page)."""
    return "\n".join(f"| `{module}` | {stages} |" for module, stages in computed().items())


def test_the_blast_radius_table_is_what_the_imports_give():
    assert documented() == computed(), "docs/architecture.md's table is stale; its rows should be:\n" + table()


def test_docs_only_code_reruns_nothing_and_a_section_module_only_its_readers():
    rows = computed()
    assert rows["tools/params_docs.py"] == "none"
    assert rows["config/sample.py"] == "sample" and rows["config/report.py"] == "report"
    assert rows["config/prepare.py"] != "prepare, tokenize, train, evaluate, sample, report"
