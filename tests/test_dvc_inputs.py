"""Every file a stage reads through its params is a DVC dependency of exactly that stage (pipeline/stage_inputs.py):
rendered into dvc.yaml, checked by the stage under DVC, and held with real DVC runs (issue 30, item 1)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SHARED_DATA, clean_env
from test_dvc import DVC, sh
from test_lm_eval import HELLASWAG_TASK

from pipeline.errors import UserError
from pipeline.params import validate_params
from pipeline.stage_inputs import check_declared, declared_for, stage_inputs
from pipeline.tools.dvc_yaml import STAGES, refresh, render

PYTHON = str(Path(DVC).with_name("python"))

METRICS_MODULE = '''\
def longest(model, tokenizer, val_tokens):
    return {"longest": 1.0}
'''


def project_files(folder: Path) -> dict:
    """The files a project's path params name, written into folder; returns the params that name them."""
    (folder / "prompts.txt").write_text("ROMEO:\nJULIET:\n")
    (folder / "ds.json").write_text(json.dumps({"wall_clock_breakdown": False, "gradient_clipping": "auto"}))
    (folder / "hellaswag.jsonl").write_text((SHARED_DATA / "hellaswag_val_sample.jsonl").read_text())
    tasks = folder / "tasks"
    tasks.mkdir()
    # The task's data file inside the task folder, so the folder dep covers it.
    (tasks / "hellaswag_local.yaml").write_text(HELLASWAG_TASK.format(path=tasks / "items.jsonl"))
    (tasks / "items.jsonl").write_text((SHARED_DATA / "hellaswag_val_sample.jsonl").read_text())
    (folder / "my_metrics.py").write_text(METRICS_MODULE)
    return {
        "train": {"deepspeed_config": "ds.json", "hellaswag_interval": 3, "hellaswag_limit": 4},
        "evaluate": {"hellaswag": "hellaswag.jsonl", "hellaswag_limit": 4, "metrics": ["my_metrics:longest"],
                     "lm_eval": {"tasks": [{"name": "hellaswag_local", "limit": 4}], "include_path": "tasks"}},
        "sample": {"prompts_file": "prompts.txt"},
    }


def merged(base: dict, extra: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


# ------------------------------------------------------------------------------------------- fast: the mapping


def test_each_path_param_is_declared_for_exactly_the_stages_that_read_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = validate_params(project_files(tmp_path))
    deps = {name: declared_for(name, p, stage["deps"], tmp_path) for name, stage in STAGES.items()}
    assert deps == {
        "prepare": [], "tokenize": [],
        "train": ["${train.deepspeed_config}", "${evaluate.hellaswag}"],
        "evaluate": ["${evaluate.hellaswag}", "${evaluate.lm_eval.include_path}", "my_metrics.py"],
        "sample": ["${sample.prompts_file}"], "report": [],
    }  # fmt: skip
    # Off by default: the default params read no such file, so the repository's dvc.yaml gains nothing.
    assert all(declared_for(name, validate_params({}), stage["deps"], tmp_path) == [] for name, stage in STAGES.items())


def test_folders_packages_globs_and_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "scores.py").write_text(METRICS_MODULE)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    (tmp_path / "texts").mkdir()
    p = validate_params({
        "prepare": {"source": {"kind": "files", "path": "texts/*.txt"}, "store": "index"},
        "model": {"init": "base"}, "tokenize": {"kind": "hf", "pretrained": "base"},
        "evaluate": {"metrics": ["pkg.scores:longest", "json:dumps"], "model_dir": "gpt2",
                     "lm_eval": {"include_path": "tasks"}},  # no tasks: the folder is not read
    })  # fmt: skip
    found = {item.key: (item.dep, item.stages) for item in stage_inputs(p, tmp_path)}
    assert found == {
        "prepare.source.path": ("texts", ("prepare", "tokenize")),  # a glob: its folder; tokenize reads it again (index)
        "tokenize.pretrained": ("${tokenize.pretrained}", ("tokenize",)),
        "model.init": ("${model.init}", ("train",)),
        "evaluate.metrics[0]": ("pkg", ("evaluate",)),  # the whole package: its modules import each other
    }  # json (installed) and the hub id gpt2 are not in the project


def test_the_stage_refuses_under_dvc_when_dvc_yaml_lacks_a_file_it_reads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = validate_params(project_files(tmp_path))
    (tmp_path / "dvc.yaml").write_text(render(None))  # rendered for the defaults: none of the files
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_STAGE", "sample")
    with pytest.raises(UserError) as e:
        check_declared(p)
    assert str(e.value).startswith("dvc.yaml: the sample stage reads sample.prompts_file (prompts.txt), which its deps do not declare")
    assert "gptpipe dvc-yaml" in str(e.value)
    (tmp_path / "dvc.yaml").write_text(render(None, p, tmp_path))
    for stage in STAGES:
        monkeypatch.setenv("DVC_STAGE", stage)
        check_declared(p)  # every stage finds its files declared
    monkeypatch.delenv("DVC_STAGE")
    (tmp_path / "dvc.yaml").write_text(render(None))
    check_declared(p)  # run by hand, not by DVC: nothing to compare


def test_gptpipe_dvc_yaml_renders_for_the_params_and_leaves_a_foreign_dvc_yaml_alone(tmp_path):
    env = clean_env()
    gptpipe = [PYTHON, "-m", "pipeline.cli"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(project_files(tmp_path)))
    (tmp_path / "dvc.yaml").write_text(render(None))
    out = subprocess.run([*gptpipe, "dvc-yaml", str(tmp_path)], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert "${sample.prompts_file}" in stages["sample"]["deps"] and "my_metrics.py" in stages["evaluate"]["deps"]
    assert refresh(tmp_path)[1] is False  # a second run changes nothing
    (tmp_path / "dvc.yaml").write_text("stages:\n  mine:\n    cmd: echo hi\n")
    out = subprocess.run([*gptpipe, "dvc-yaml", str(tmp_path)], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "was not written by gptpipe" in out.stderr and "Traceback" not in out.stderr
    assert (tmp_path / "dvc.yaml").read_text() == "stages:\n  mine:\n    cmd: echo hi\n"


# ------------------------------------------------------------------------------------------ slow: real DVC


def status(repo: Path) -> set[str]:
    return set(json.loads(sh(DVC, "status", "--json", cwd=repo).strip() or "{}"))


@pytest.mark.slow
def test_editing_each_file_a_param_names_makes_exactly_its_readers_stale(tmp_path, shared_data):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("pipeline", "data/raw"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "data" / "raw" / "corpus.txt").write_text((shared_data / "tinyshakespeare.txt").read_text()[:60_000])
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"]["source"] = {"kind": "files", "path": "data/raw/corpus.txt", "separator": "\n\n"}
    params["tokenize"].update(kind="bpe", vocab_size=300)  # lm-eval needs a transformers tokenizer: bpe has one
    params["model"].update(n_layer=1, n_head=2, n_embd=32, block_size=256)  # room for HellaSwag endings
    params["train"].update(max_steps=6, micro_batch_size=4, warmup_steps=1, log_interval=2, eval_interval=3, save_interval=3)
    params["sample"].update(num_samples=1, max_new_tokens=8)
    params = merged(params, project_files(repo))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(PYTHON, "-m", "pipeline.tools.dvc_yaml", cwd=repo)  # the repository's form: code deps, and the files
    sh("git", "init", "-q", cwd=repo)
    sh(DVC, "init", "-q", cwd=repo)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    out = sh(DVC, "repro", cwd=repo)
    assert "Running stage 'report'" in out
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert metrics["lm_eval"]["hellaswag_local"]["n"] == 4 and "longest" in json.dumps(metrics)
    assert status(repo) == set()

    edits = {
        "ds.json": {"train"},
        "hellaswag.jsonl": {"train", "evaluate"},  # in-training HellaSwag reads it too
        "tasks/items.jsonl": {"evaluate"},  # the task's data, inside the task folder
        "tasks/hellaswag_local.yaml": {"evaluate"},
        "my_metrics.py": {"evaluate"},
        "prompts.txt": {"sample"},
    }
    for name, expected in edits.items():
        original = (repo / name).read_bytes()
        (repo / name).write_bytes(original + b"\n")
        try:
            assert status(repo) == expected, name
        finally:
            (repo / name).write_bytes(original)
    assert status(repo) == set()

    # A local model to fine-tune: the export of the run above, as a folder of its own.
    shutil.copytree(repo / "models" / "final", repo / "base")
    params["model"] = {key: value for key, value in params["model"].items() if key not in ("n_layer", "n_head", "n_embd", "preset")}
    params["model"]["init"] = "base"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(PYTHON, "-m", "pipeline.tools.dvc_yaml", cwd=repo)
    sh(DVC, "repro", cwd=repo)
    assert status(repo) == set()
    (repo / "base" / "notes.txt").write_text("an edit inside the model folder\n")
    assert status(repo) == {"train"}
    (repo / "base" / "notes.txt").unlink()

    # A param pointed at a file dvc.yaml does not declare (a metrics module, declared by its file): the stage says
    # so and runs nothing, rather than run untracked.
    (repo / "other.py").write_text(METRICS_MODULE)
    params["evaluate"]["metrics"] = ["other:longest"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**clean_env(), "PATH": f"{Path(DVC).parent}:/usr/bin:/bin"}
    run = subprocess.run([DVC, "repro", "evaluate"], cwd=repo, env=env, capture_output=True, text=True)
    assert run.returncode != 0
    said = run.stdout + run.stderr
    assert "the evaluate stage reads evaluate.metrics[0] (other.py), which its deps do not declare" in said, said[-2000:]
    assert "Traceback" not in said


def test_recipe_use_renders_the_file_deps_for_the_params_it_writes(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(project_files(tmp_path)))
    refresh(tmp_path)
    assert "${sample.prompts_file}" in (tmp_path / "dvc.yaml").read_text()
    out = subprocess.run([PYTHON, "-m", "pipeline.cli", "recipe", "use", "shakespeare-char", "--force", "--params", str(tmp_path / "params.yaml")],
                         env=clean_env(), capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    # The recipe names no prompts file: a dep left on a null param would stop DVC before any stage runs.
    assert "prompts_file" not in (tmp_path / "dvc.yaml").read_text()
    assert (tmp_path / "dvc.yaml").read_text() == render(None, validate_params(yaml.safe_load((tmp_path / "params.yaml").read_text())), tmp_path)
