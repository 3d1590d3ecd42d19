"""A stage's code deps hold the schema of each params section it reads and of no other, the progress bars only where it
draws them, the params docs generator never: so editing sample's or report's fields does not retrain."""

import ast
from functools import cache
from pathlib import Path

from conftest import ROOT
from test_dvc import BLAST_RADIUS

from pipeline.config.all import SECTIONS
from pipeline.tools.dvc_yaml import STAGES, imported_modules, stage_code

# A schema a stage's own code runs, beside those of the sections it declares: tokenize reads prepare's sources again
# (prepare.store: index) through prepare's schema, built from the manifest's params.
RUNS_SCHEMA = {"tokenize": {"prepare"}}


@cache
def code_of(stage: str) -> frozenset[str]:
    return frozenset(stage_code(STAGES[stage]["package"], ROOT))


def test_the_config_package_is_one_module_per_section_and_its_init_imports_nothing():
    """Whatever config/__init__.py imported would be code of every stage."""
    assert not (ROOT / "pipeline" / "config.py").exists()
    assert {path.stem for path in (ROOT / "pipeline" / "config").glob("*.py")} == {"__init__", "base", "all", *SECTIONS}
    tree = ast.parse((ROOT / "pipeline" / "config" / "__init__.py").read_text())
    assert not [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def test_a_stage_depends_on_the_schemas_of_the_sections_it_reads_and_no_other():
    for name, stage in STAGES.items():
        code = code_of(name)
        schemas = {Path(path).stem for path in code if path.startswith("pipeline/config/") and Path(path).stem in SECTIONS}
        declared = {param.split(".")[0] for param in stage["params"]}
        assert schemas == declared | RUNS_SCHEMA.get(name, set()), (name, sorted(schemas))
        # Every stage still validates the whole file, so the shared schema code stays its dependency.
        assert {"pipeline/config/base.py", "pipeline/config/all.py", "pipeline/params.py"} <= code, name


def test_each_edit_of_the_blast_radius_list_is_code_of_exactly_its_stages():
    """The fast side of test_dvc.py's real `dvc status` check: the code deps dvc.yaml lists name the same stages."""
    for path, expected in BLAST_RADIUS.items():
        assert (ROOT / path).is_file(), path
        stale = {name for name in STAGES if path in code_of(name)}
        assert stale == expected, f"{path} is code of {sorted(stale)}, expected {sorted(expected)}"


def test_an_import_for_annotations_only_is_no_code_of_a_stage(tmp_path):
    """`if TYPE_CHECKING:` never runs: tokenizers.py names TokenizeConfig only in annotations."""
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\n\nfrom pipeline.errors import UserError\n\n"
                      "if TYPE_CHECKING:\n    from pipeline.config.tokenize import TokenizeConfig\n")
    assert imported_modules(source, ROOT) == {"pipeline.errors"}
