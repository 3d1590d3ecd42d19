"""docs/architecture.md against the code: its module table names every module, and every import keeps its rules."""

import ast
import re
from pathlib import Path

from conftest import ROOT

DOC = (ROOT / "docs" / "architecture.md").read_text()
# The ground modules; config/ is a package of them (one schema per params section), ground all the same.
GROUND = {"config", "params", "errors", "layout", "files", "output", "machine", "downloads", "stage_inputs", "tokens", "console", "progress"}


def modules() -> dict[str, Path]:
    """'prepare/stage' -> its file, for every module of pipeline/ but package __init__ and __main__ files."""
    out = {}
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        out[str(path.relative_to(ROOT / "pipeline").with_suffix(""))] = path
    return out


def table(heading: str) -> list[list[str]]:
    """The rows of the first table after a line starting with heading, each cell stripped."""
    after = DOC[DOC.index(heading):]
    rows = [line for line in after.splitlines() if line.startswith("|")]
    first = after.index(rows[0])
    block = []
    for line in after[first:].splitlines():
        if not line.startswith("|"):
            break
        block.append([cell.strip() for cell in line.strip("|").split("|")])
    return block[2:]  # without the header and the rule


def names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def package_of(module: str) -> str:
    if module.split("/")[0] in GROUND:
        return "ground"
    return module.split("/")[0] if "/" in module else ("cli" if module == "cli" else "ground")


def allowed(target: str, rule: list[str]) -> bool:
    return any(target == r or (r.endswith("/") and target.startswith(r)) for r in rule)


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, function-level ones too; pipeline modules as 'pkg/mod'."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            found.append((t, node.lineno))
    return found


def test_the_module_table_names_every_module_and_only_those():
    documented = {name.removesuffix(".py") for row in table("| module |") for name in names(row[0])[:1]}
    actual = set(modules())
    assert not actual - documented, f"docs/architecture.md does not list {sorted(actual - documented)}"
    assert not documented - actual, f"docs/architecture.md lists modules that do not exist: {sorted(documented - actual)}"


def import_rules() -> dict[str, list[str]]:
    return {names(row[0])[0].rstrip("/") if names(row[0]) else row[0]: [] if row[1] == "nothing" else names(row[1])
            for row in table("| package |")}


def rule_violations(files: dict[str, Path], rules: dict[str, list[str]]) -> list[str]:
    """Every import in files that the package table does not allow, as 'module:line imports ...'."""
    broken = []
    for module, path in files.items():
        package = package_of(module)
        for target, line in imports(path):
            if not target.startswith("pipeline."):
                continue
            parts = target.split(".")[1:]
            dotted = "/".join(parts)
            if dotted not in files:
                continue  # a package itself, or a name imported from a module (checked as the module)
            other = package_of(dotted)
            if other == "ground" and package != "cli" or other == package and package != "ground":
                continue
            if package == "ground" and other != "ground":
                broken.append(f"{module}:{line} imports {dotted}: ground modules import ground modules only")
            elif not allowed(dotted, rules.get(package, [])):
                broken.append(f"{module}:{line} imports {dotted}, which docs/architecture.md does not allow for {package}/")
    return broken


def test_every_pipeline_import_keeps_the_documented_rules():
    rules = import_rules()
    assert {"prepare", "train", "cli", "tools"} <= set(rules), rules
    broken = rule_violations(modules(), rules)
    assert not broken, "\n".join(broken)


def test_third_party_libraries_stay_in_their_homes():
    homes = {names(row[0])[0]: names(row[1]) for row in table("| library |")}
    assert set(homes) == {"deepspeed", "typer", "rich", "peft"}
    broken = []
    for module, path in modules().items():
        for target, line in imports(path):
            library = target.split(".")[0]
            if library in homes and not allowed(module, homes[library]):
                broken.append(f"{module}:{line} imports {library}, whose home is {', '.join(homes[library])}")
    assert not broken, "\n".join(broken)


def test_no_stage_module_is_imported_by_another_package():
    """A stage's orchestration and command belong to its own package (and its command to the cli's map)."""
    stage_files = {m for m in modules() if m.endswith(("/stage", "/loop", "/command"))}
    for module, path in modules().items():
        for target, line in imports(path):
            dotted = "/".join(target.split(".")[1:])
            if dotted in stage_files and package_of(dotted) != package_of(module):
                assert module == "cli" and dotted.endswith("/command"), f"{module}:{line} imports {dotted}"


def test_the_rule_checker_catches_a_broken_rule(tmp_path):
    """The checks above can fail: a planted module of prepare/ that imports the train loop, and a ground module that
    imports a package, a function-level import among them, are each reported."""
    assert not allowed("eval/stage", ["eval/lm", "eval/hellaswag"]) and allowed("infra/launcher", ["infra/"])
    assert package_of("train/loop") == "train" and package_of("tokens") == "ground" and package_of("cli") == "cli"
    (tmp_path / "planted.py").write_text("import json\n\n\ndef f():\n    from pipeline.train.loop import train\n")
    (tmp_path / "ground.py").write_text("from pipeline.eval import lm\n")
    files = {**modules(), "prepare/planted": tmp_path / "planted.py", "planted_ground": tmp_path / "ground.py"}
    assert rule_violations(files, import_rules()) == [
        "prepare/planted:5 imports train/loop, which docs/architecture.md does not allow for prepare/",
        "planted_ground:1 imports eval/lm: ground modules import ground modules only",
    ]


def test_the_ground_modules_are_those_the_page_names():
    sentence = DOC[DOC.index("The ground modules are"):DOC.index("they import each other only")]
    assert {name.rstrip("/") for name in names(sentence)} == GROUND
    assert package_of("config/train") == "ground" and package_of("progress") == "ground"
