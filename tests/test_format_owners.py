"""Each file format has one owner that writes and reads it (docs/architecture.md): outside it, a module only checks
that such a file exists, names it in a message, or hands its path to the owner; it never opens the file, reads it
by key, spells its name, or knows the token header or a token writer's temporary file."""

import ast
import textwrap

from conftest import ROOT
from test_architecture import modules

OWNERS = {"state.json": "checkpoints/state", "gptpipe.json": "checkpoints/state", "token files": "tokens"}
# The layout classes whose attributes are a format's path, and the writers whose temporary file is one.
KINDS = {"CheckpointDir", "ExportDir", "RunDir", "TokensDir", "TokenWriter", "ShardWriter"}
PATHS = {("CheckpointDir", "state"): "state.json", ("ExportDir", "info"): "gptpipe.json",
         ("TokensDir", "shard"): "token files", ("TokensDir", "shards"): "token files",
         ("TokenWriter", "tmp"): "token files", ("TokenWriter", "temporary"): "token files"}
RETURNS = {"step": "CheckpointDir", "find_checkpoint": "CheckpointDir"}  # calls that give a step folder
ATTRIBUTES = {("ShardWriter", "current"): "TokenWriter"}
NAMES = {"state.json": "state.json", "gptpipe.json": "gptpipe.json"}  # spelled anywhere but layout.py and the owner
HEADER = {"HEADER", "HEADER_BYTES", "MAGIC", "DTYPES"}  # tokens.py's header layout
CHECKS = {"is_file", "exists", "is_dir", "name"}  # what anyone may ask of an owned file's path


def kind_of(node: ast.AST, bound: dict[str, str]) -> str | None:
    """Which of KINDS an expression is, as far as this module shows: a constructor call, a step folder's call, a name
    or attribute bound to one."""
    if isinstance(node, ast.Call):
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        return name if name in KINDS else RETURNS.get(name)
    if isinstance(node, ast.Name):
        return node.id if node.id in KINDS else bound.get(node.id)
    if isinstance(node, ast.Attribute):
        return ATTRIBUTES.get((kind_of(node.value, bound), node.attr)) or bound.get(ast.unparse(node))
    return None


def bindings(tree: ast.AST) -> dict[str, str]:
    """Names (and self.attributes) of the module bound to one of KINDS: assigned, annotated, or a loop over steps()."""
    bound: dict[str, str] = {}
    for _ in range(2):  # a second pass for names bound from names
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign):
                targets, value = [node.target], node.value
            elif isinstance(node, ast.For) and isinstance(node.iter, ast.Call) and getattr(node.iter.func, "attr", None) == "steps":
                targets, value = [node.target], ast.Call(ast.Name("CheckpointDir"), [], [])
            else:
                targets, value = [], None
            kind = kind_of(value, bound) if value is not None else None
            for target in targets:
                if kind and isinstance(target, (ast.Name, ast.Attribute)):
                    bound[ast.unparse(target)] = kind
            annotated = [(node.target, node.annotation)] if isinstance(node, ast.AnnAssign) else []
            if isinstance(node, ast.arg) and node.annotation is not None:
                annotated = [(ast.Name(node.arg), node.annotation)]
            for target, annotation in annotated:
                for kind in KINDS:
                    if kind in ast.unparse(annotation).replace("|", " ").split():
                        bound[ast.unparse(target)] = kind
    return bound


def owner_api(owner: str) -> set[str]:
    """What a module may hand an owned path to: the owner's functions, classes and methods."""
    tree = ast.parse((ROOT / "pipeline" / f"{owner}.py").read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def format_uses(module: str, source: str, handing: bool = True) -> list[str]:
    """Every use of a format outside its owner in a module's source, as 'module:line how format (owner's)', in line
    order; handing=False reports paths handed to the owner too."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    bound = bindings(tree)
    found = []

    def report(node: ast.AST, how: str, fmt: str) -> None:
        if OWNERS[fmt] != module:
            found.append(f"{module}:{node.lineno} {how} {fmt} ({OWNERS[fmt]}'s)")

    def handed_to_owner(node: ast.AST, fmt: str) -> bool:
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute) and parent.attr in CHECKS or isinstance(parent, ast.FormattedValue):
            return True
        if isinstance(parent, ast.Call) and node is not parent.func:
            func = parent.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            return handing and name in owner_api(OWNERS[fmt])
        return False

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and (kind_of(node.value, bound), node.attr) in PATHS:
            fmt = PATHS[kind_of(node.value, bound), node.attr]
            used = parents[node] if isinstance(parents.get(node), ast.Call) and parents[node].func is node else node
            if not handed_to_owner(used, fmt):
                report(node, f"uses the path of {ast.unparse(node)}:", fmt)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and not isinstance(parents.get(node), ast.Expr):
            for name, fmt in NAMES.items():  # a docstring (a bare string) may mention the file
                if name in node.value and module != "layout":
                    report(node, f"spells the name {name!r} of", fmt)
        elif isinstance(node, ast.ImportFrom) and node.module == "pipeline.tokens":
            for alias in node.names:
                if alias.name in HEADER:
                    report(node, f"imports {alias.name}, the header of", "token files")
        elif isinstance(node, ast.Attribute) and node.attr in HEADER and ast.unparse(node.value).endswith("tokens"):
            report(node, f"uses {ast.unparse(node)}, the header of", "token files")
    return sorted(found, key=lambda use: int(use.split(":")[1].split()[0]))  # ast.walk goes breadth first


def test_no_module_reads_a_file_format_it_does_not_own():
    found = [use for module, path in modules().items() for use in format_uses(module, path.read_text())]
    assert not found, "\n".join(found)


def test_the_checker_sees_the_paths_that_exist():
    """The patterns match the real code: counting paths handed to the owner as uses, the step folders' readers of
    state.json and the export's writer of gptpipe.json are found, and tokens.py's own shards read as another module's."""
    strict = {module: format_uses(module, path.read_text(), handing=False) for module, path in modules().items()}
    for module, fmt in (("checkpoints/folder", "state.json"), ("checkpoints/elastic", "state.json"), ("train/export", "gptpipe.json")):
        assert any(f" {fmt} (" in use for use in strict[module]), (module, strict[module])
    assert any(" token files (" in use for use in format_uses("eval/elsewhere", (ROOT / "pipeline" / "tokens.py").read_text()))


PLANTED = '''\
import json
from pathlib import Path

from pipeline.checkpoints.state import TrainState
from pipeline.layout import CheckpointDir, ExportDir, RunDir, TokensDir
from pipeline.tokens import HEADER_BYTES, open_tokens


def step_of(folder):
    ckpt = CheckpointDir(folder)
    return json.loads(ckpt.state.read_text())["step"]


def tokenizer_of(folder):
    return json.loads((Path(folder) / "gptpipe.json").read_text())["tokenizer"]


def params_of(folder):
    info = ExportDir(folder).info
    return json.loads(info.read_text())["params"]


def newest_step(run: RunDir):
    for ckpt in run.steps():
        if ckpt.state.is_file():
            return json.loads(open(ckpt.state).read())["step"]


def first_shard(folder):
    out = TokensDir(folder)
    return out.shard("train", 0).read_bytes()[HEADER_BYTES:]


def fine(folder, ckpt: CheckpointDir):
    """Reads nothing of state.json or gptpipe.json by itself."""
    if ckpt.state.is_file() and ExportDir(folder).info.exists():
        return TrainState.read(ckpt.state), f"{ckpt.state} and {ckpt.state.name}", open_tokens(TokensDir(folder).shard("val", 0))
'''


def test_the_checker_reports_each_planted_read_and_no_allowed_use():
    """A module that reads state.json and gptpipe.json by key, walks a run's steps to open state.json, and cuts a shard
    past the header is reported at each read; checks, messages and the owners' own readers are not."""
    found = format_uses("eval/planted", PLANTED)
    assert found == [
        "eval/planted:6 imports HEADER_BYTES, the header of token files (tokens's)",
        "eval/planted:11 uses the path of ckpt.state: state.json (checkpoints/state's)",
        "eval/planted:15 spells the name 'gptpipe.json' of gptpipe.json (checkpoints/state's)",
        "eval/planted:19 uses the path of ExportDir(folder).info: gptpipe.json (checkpoints/state's)",
        "eval/planted:26 uses the path of ckpt.state: state.json (checkpoints/state's)",
        "eval/planted:31 uses the path of out.shard: token files (tokens's)",
    ], found
    # The same reads inside the owner of each format are that owner's business.
    assert [use for use in format_uses("checkpoints/state", PLANTED) if "token files" in use] and not [
        use for use in format_uses("checkpoints/state", PLANTED) if "state.json" in use or "gptpipe.json" in use]
    # A module text the test suite did not write: a real module with one by-key read planted in a copy of it.
    inference = (ROOT / "pipeline" / "model" / "inference.py").read_text()
    planted = inference + textwrap.dedent('''

        def planted_step(folder):
            return json.loads(CheckpointDir(folder).state.read_text())["step"]
        ''')
    assert not format_uses("model/inference", inference)
    assert [use for use in format_uses("model/inference", planted) if "CheckpointDir(folder).state" in use]
