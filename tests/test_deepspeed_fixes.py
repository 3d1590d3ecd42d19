"""DeepSpeed's corrections (pipeline/infra/deepspeed_fixes.py), against the DeepSpeed installed here: each one puts
back exactly what it changed (also when the block raises), refuses a DeepSpeed without what it patches, no other
module of pipeline/ patches DeepSpeed or torch, and pyproject.toml's bound holds the DeepSpeed the suite runs on."""

import ast
import importlib
import importlib.metadata
import os
import tomllib
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_training, tiny_params
from packaging.requirements import Requirement
from packaging.version import Version

from pipeline.config.model import ModelConfig
from pipeline.config.train import TrainConfig
from pipeline.infra import deepspeed_fixes as fixes
from pipeline.model.build import build_model
from pipeline.train.optimizer import param_groups

ENV = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "TORCH_FORCE_WEIGHTS_ONLY_LOAD")


class Boom(Exception):
    pass


def module(name: str):
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def engine():
    """A real DeepSpeed engine (ZeRO 0, one process) for the correction that works on an engine."""
    from pipeline.infra.deepspeed import build_engine, engine_config
    from pipeline.infra.distributed import init_distributed

    t = TrainConfig(warmup_steps=2)
    init_distributed()
    model = build_model(ModelConfig(arch="gpt2", n_layer=1, n_head=2, n_embd=16, block_size=16), vocab_size=65, eot_id=0)
    return build_engine(model, t, engine_config(t, t.batch(1, 16)), param_groups(model, t))


def patched_attributes(name: str, engine) -> tuple[object, list[tuple[object, str]]]:
    """(the correction's context manager, the (object, attribute) pairs it changes while it is entered)."""
    muon = [(module(m), n) for m, names in fixes.MUON_FUNCTIONS.items() for n in names]
    c10d = module("torch.distributed.distributed_c10d")
    return {
        "deepspeed_environment": (fixes.deepspeed_environment(), []),
        "muon_tags_kept": (fixes.muon_tags_kept([]), [(module("deepspeed"), "set_optimizer_flags")]),
        "eager_muon": (fixes.eager_muon(), muon),
        "shm_op_skipped": (fixes.shm_op_skipped(), [(module("deepspeed.comm.torch"), "build_shm_op")]),
        "group_timeout": (fixes.group_timeout(7), [(c10d, "default_pg_timeout"), (c10d, "default_pg_nccl_timeout")]),
        "weights_only_loads": (fixes.weights_only_loads(), []),
        "universal_load": (fixes.universal_load(engine, True), [(engine._config, "load_universal_checkpoint")]),
    }[name]


def environment() -> dict:
    return {key: os.environ.get(key) for key in ENV}


@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
@pytest.mark.parametrize("name", fixes.CORRECTIONS)
def test_each_correction_puts_back_the_very_objects_it_replaced(name, raises, engine):
    cm, attributes = patched_attributes(name, engine)
    before = [getattr(obj, attr) for obj, attr in attributes]
    env, safe = environment(), list(torch.serialization.get_safe_globals())
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    try:
        with cm:
            inside = [getattr(obj, attr) for obj, attr in attributes]
            assert inside != before or name in ("deepspeed_environment", "weights_only_loads"), f"{name} patched nothing"
            if name == "weights_only_loads":
                assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1" and len(torch.serialization.get_safe_globals()) > len(safe)
            if name == "deepspeed_environment":
                assert os.environ["TORCH_EXTENSIONS_DIR"]
            if raises:
                raise Boom
    except Boom:
        assert raises
    after = [getattr(obj, attr) for obj, attr in attributes]
    assert all(a is b for a, b in zip(after, before)), f"{name} left {[a for a, b in zip(after, before) if a is not b]}"
    assert environment() == env, f"{name} left the environment changed"
    # torch puts the list back through a set (clear, then add the saved ones): the same entries, maybe in another order.
    assert set(torch.serialization.get_safe_globals()) == set(safe)
    assert [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups] == groups


@contextmanager
def deleted(obj, attr: str):
    """obj without attr while the block runs (what a DeepSpeed that renamed it looks like), then the same object back."""
    value = getattr(obj, attr)
    delattr(obj, attr)
    try:
        yield
    finally:
        setattr(obj, attr, value)


def refusals(tmp_path: Path) -> dict:
    """name -> (what to enter while DeepSpeed lacks what the correction patches, what the message names)."""
    ds, comm = module("deepspeed"), module("deepspeed.comm.torch")
    muon = {name: module(name) for name in fixes.MUON_FUNCTIONS}
    silent = tmp_path / "real_accelerator.py"
    silent.write_text("def get_accelerator():\n    return None\n")
    no_classes = {name: module(name) for name in fixes.CHECKPOINT_CLASSES}
    no_classes["deepspeed.runtime.zero.config"] = types.ModuleType("deepspeed.runtime.zero.config")
    engine_without_switch = types.SimpleNamespace(_config=types.SimpleNamespace(), optimizer=types.SimpleNamespace(param_groups=[]))

    @contextmanager
    def without(obj, attr, cm_factory):
        with deleted(obj, attr):
            with cm_factory():
                yield

    return {
        "deepspeed_environment": (lambda: fixes.deepspeed_environment(accelerator_file=silent), "DS_ACCELERATOR"),
        "muon_tags_kept": (lambda: without(ds, "set_optimizer_flags", lambda: fixes.muon_tags_kept([])), "set_optimizer_flags"),
        "eager_muon": (lambda: without(muon["deepspeed.runtime.zero.muon.original_muon"], "zeropower_via_gram_newtonschulz", fixes.eager_muon),
                       "zeropower_via_gram_newtonschulz"),
        "shm_op_skipped": (lambda: without(comm, "build_shm_op", fixes.shm_op_skipped), "build_shm_op"),
        "group_timeout": (lambda: fixes.group_timeout(7, c10d=types.ModuleType("distributed_c10d")), "default_pg_timeout"),
        "weights_only_loads": (lambda: fixes.weights_only_loads(modules=no_classes), "ZeroStageEnum"),
        "universal_load": (lambda: fixes.universal_load(engine_without_switch, True), "load_universal_checkpoint"),
    }


@pytest.mark.parametrize("name", fixes.CORRECTIONS)
def test_each_correction_refuses_a_deepspeed_without_what_it_patches(name, tmp_path):
    enter, what = refusals(tmp_path)[name]
    env = environment()
    with pytest.raises(fixes.CorrectionMissing) as refused:
        with enter():
            pass
    message = str(refused.value)
    assert what in message and f"`{name}`" in message and fixes.WRITTEN_FOR in message
    assert fixes.installed_version() in message
    assert environment() == env


def test_the_extensions_check_reads_torch_itself():
    """torch's TORCH_EXTENSIONS_DIR switch is the other half of deepspeed_environment: a torch without it is refused."""
    stand_in = types.ModuleType("cpp_extension")
    stand_in._get_build_directory = lambda name, verbose: name  # a build directory that ignores the variable
    with pytest.raises(fixes.CorrectionMissing, match="TORCH_EXTENSIONS_DIR"):
        with fixes.deepspeed_environment(extensions_reader=stand_in):
            pass


def test_a_muon_run_on_a_cpu_leaves_deepspeed_and_the_environment_as_it_found_them(tokens_dir, tmp_path):
    """The corrections the whole run holds (eager Muon, the environment) are undone when train() returns."""
    muon = [(module(m), n) for m, names in fixes.MUON_FUNCTIONS.items() for n in names]
    before, env = [getattr(m, n) for m, n in muon], environment()
    raw = tiny_params(tokens_dir, tmp_path, optimizer="muon", muon_lr=0.02, lr=3e-3, max_steps=2, eval_interval=2, save_interval=2)
    assert run_training(raw)["steps"] == 2
    assert all(getattr(m, n) is b for (m, n), b in zip(muon, before)), "Muon's compiled functions were left unwrapped"
    assert environment() == env


# --- no other module patches DeepSpeed or torch -------------------------------------------------------------------

ROOTS = ("deepspeed", "torch")
# torch's own switches for a setting of the user's (train.tf32), not a correction of DeepSpeed: allowed where they live.
ALLOWED = {("infra/hardware.py", "torch.backends.cuda.matmul.allow_tf32"), ("infra/hardware.py", "torch.backends.cudnn.allow_tf32")}


def is_library(name: str) -> bool:
    return name.split(".")[0] in ROOTS


def imports_library_module(node: ast.AST) -> bool:
    """importlib.import_module("deepspeed...") (f-strings too), or a list of such calls."""
    if isinstance(node, (ast.List, ast.Tuple, ast.ListComp, ast.GeneratorExp)):
        return any(imports_library_module(n) for n in ast.walk(node) if n is not node and isinstance(n, ast.Call))
    if not (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))):
        return False
    if (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) != "import_module" or not node.args:
        return False
    arg = node.args[0]
    text = arg.value if isinstance(arg, ast.Constant) else (arg.values[0].value if isinstance(arg, ast.JoinedStr) and arg.values
                                                              and isinstance(arg.values[0], ast.Constant) else "")
    return isinstance(text, str) and is_library(text)


def dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "<call>")
    return ".".join(reversed(parts))


def root_of(node: ast.AST) -> ast.AST:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node


def library_patches(source: str) -> list[str]:
    """Each assignment (`module.attr = ...`, setattr, delattr) onto a deepspeed or torch module, or a name bound to one
    (imported, from importlib.import_module, or a loop over those), and each write of an environment variable a
    correction owns: 'line: what'."""
    tree = ast.parse(source)
    libs = set(ROOTS)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            libs |= {(a.asname or a.name.split(".")[0]) for a in node.names if is_library(a.name)}
        elif isinstance(node, ast.ImportFrom) and node.module and is_library(node.module):
            libs |= {(a.asname or a.name) for a in node.names}
    for _ in range(2):  # loops over a list of modules bind a module too
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and imports_library_module(node.value):
                libs |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.iter, ast.Name) and node.iter.id in libs \
                    and isinstance(node.target, ast.Name):
                libs.add(node.target.id)

    def on_library(target: ast.AST) -> bool:
        root = root_of(target)
        return (isinstance(root, ast.Name) and root.id in libs) or imports_library_module(root)

    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for t in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if isinstance(t, ast.Attribute) and on_library(t.value):
                    found.append(f"{node.lineno}: {dotted(t)} =")
                if isinstance(t, ast.Subscript) and dotted(t.value) == "os.environ" and isinstance(t.slice, ast.Constant) \
                        and t.slice.value in ENV:
                    found.append(f"{node.lineno}: os.environ[{t.slice.value!r}] =")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr") and node.args \
                and on_library(node.args[0]):
            found.append(f"{node.lineno}: {node.func.id}({dotted(node.args[0])}, ...)")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and dotted(node.func.value) == "os.environ" \
                and node.func.attr in ("setdefault", "update", "pop", "__setitem__") and node.args \
                and isinstance(node.args[0], ast.Constant) and node.args[0].value in ENV:
            found.append(f"{node.lineno}: os.environ.{node.func.attr}({node.args[0].value!r})")
    return found


def test_no_module_but_the_corrections_patches_deepspeed_or_torch():
    pipeline = ROOT / "pipeline"
    problems = []
    for path in sorted(pipeline.rglob("*.py")):
        where = str(path.relative_to(pipeline))
        if where == "infra/deepspeed_fixes.py":
            continue
        for found in library_patches(path.read_text()):
            if (where, found.split(": ", 1)[1].removesuffix(" =")) not in ALLOWED:
                problems.append(f"pipeline/{where}:{found}")
    assert not problems, "patch DeepSpeed or torch in pipeline/infra/deepspeed_fixes.py only (a context manager): " + "; ".join(problems)


@pytest.mark.parametrize("planted", [
    "import deepspeed\ndeepspeed.set_optimizer_flags = lambda c, m: None\n",
    "def f(deepspeed):\n    deepspeed.set_optimizer_flags = None\n",
    "from torch.distributed import distributed_c10d\ndistributed_c10d.default_pg_timeout = 5\n",
    "import torch.distributed as td\ntd.distributed_c10d.default_pg_timeout = 5\n",
    "import importlib\nimportlib.import_module('deepspeed.comm.torch').build_shm_op = lambda: None\n",
    "import importlib\nsetattr(importlib.import_module('deepspeed.comm.torch'), 'build_shm_op', None)\n",
    "import importlib\nmods = [importlib.import_module(f'deepspeed.runtime.{n}') for n in ('a', 'b')]\n"
    "for m in mods:\n    setattr(m, 'muon_update', None)\n",
    "import os\nos.environ.setdefault('DS_ACCELERATOR', 'cpu')\n",
    "import os\nos.environ['TORCH_FORCE_WEIGHTS_ONLY_LOAD'] = '1'\n",
])
def test_the_scan_finds_a_planted_patch(planted, tmp_path):
    planted_file = tmp_path / "planted.py"
    planted_file.write_text(planted)
    assert library_patches(planted_file.read_text()), planted


def test_the_scan_leaves_plain_objects_alone():
    assert not library_patches("import torch\nengine = object()\nengine.gptpipe_lr_factors = [1.0]\nx = torch.zeros(1)\n"
                               "def f(config, p):\n    setattr(config, 'dropout', 0.0)\n    p.use_muon = True\n")


# --- the version bound --------------------------------------------------------------------------------------------


def test_pyproject_bounds_deepspeed_to_what_the_suite_runs_on():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (requirement,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "deepspeed"]
    installed = importlib.metadata.version("deepspeed")
    assert requirement.specifier.contains(installed), f"deepspeed {installed} is outside pyproject.toml's {requirement.specifier}"
    assert any(s.operator in ("<", "<=", "==", "~=") for s in requirement.specifier), "no upper bound on deepspeed"
    assert not requirement.specifier.contains("1000"), "the bound lets any later DeepSpeed in"
    pinned = [line.split("==")[1].strip() for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("deepspeed==")]
    assert pinned == [fixes.WRITTEN_FOR], "constraints.txt (what scripts/setup.sh installs) pins another DeepSpeed than the corrections'"
    assert requirement.specifier.contains(fixes.WRITTEN_FOR) and Version(installed) == Version(fixes.WRITTEN_FOR)
