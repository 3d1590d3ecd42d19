"""dvc.yaml against the code, and the real pipeline through real DVC in a temporary git repo."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, clean_env

from pipeline.tools.dvc_yaml import STAGES, repository_yaml, stage_code

DVC = str(Path(sys.executable).with_name("dvc"))


# ----------------------------------------------------------------------------------- dvc.yaml's deps


def test_dvc_yaml_is_what_its_one_source_renders():
    """dvc.yaml lists each stage's import closure; a change of imports or layout must regenerate it."""
    assert (ROOT / "dvc.yaml").read_text() == repository_yaml(ROOT), "dvc.yaml is stale: run `python -m pipeline.tools.dvc_yaml`"


def test_each_stage_depends_on_its_own_code_and_never_on_another_stage_or_a_tool():
    for name, stage in STAGES.items():
        code = stage_code(stage["package"], ROOT)
        assert f"pipeline/{stage['package']}/stage.py" in code or name == "train"
        others = [f"pipeline/{s['package']}/{part}" for s in STAGES.values() if s is not stage for part in ("stage.py", "command.py", "__main__.py")]
        assert not set(code) & set(others), (name, sorted(set(code) & set(others)))
        assert not [c for c in code if c.startswith("pipeline/tools/") or c == "pipeline/cli.py"], name


# Edits of one file, and the stages each must make stale: only those whose code it is.
BLAST_RADIUS = {
    "pipeline/prepare/formats.py": {"prepare", "tokenize"},  # the CSV reader: tokenize reads sources again (store: index)
    "pipeline/tools/doctor.py": set(),
    "pipeline/tools/recipes.py": set(),
    "pipeline/cli.py": set(),
    "pipeline/eval/stage.py": {"evaluate"},
    "pipeline/sample/stage.py": {"sample"},  # the samples writer
    "pipeline/infra/launcher.py": {"train"},
    "pipeline/report/stage.py": {"report"},
    "pipeline/eval/hellaswag.py": {"train", "evaluate"},  # in-training HellaSwag scores with it too
    # A section's schema: the stages that declare a key of it (tokenize also runs prepare's, to read the sources again).
    "pipeline/config/prepare.py": {"prepare", "tokenize", "train", "evaluate"},  # train and evaluate: prepare.download_dir
    "pipeline/config/tokenize.py": {"tokenize"},
    "pipeline/config/model.py": {"train", "evaluate", "sample"},
    "pipeline/config/train.py": {"train", "evaluate", "sample"},  # evaluate and sample: train.precision
    "pipeline/config/evaluate.py": {"train", "evaluate"},  # train: in-training HellaSwag's keys
    "pipeline/config/sample.py": {"sample"},
    "pipeline/config/report.py": {"report"},
    "pipeline/progress.py": {"prepare", "tokenize", "train", "evaluate"},  # the stages that draw progress bars
    "pipeline/tools/params_docs.py": set(),
}


def check_blast_radius(repo: Path) -> None:
    """After a complete `dvc repro`: each edit makes exactly its stages stale (`dvc status`), then is undone."""
    for path, expected in BLAST_RADIUS.items():
        original = (repo / path).read_text()
        (repo / path).write_text(original + "\n# an edit\n")
        try:
            stale = set(json.loads(sh(DVC, "status", "--json", cwd=repo).strip() or "{}"))
        finally:
            (repo / path).write_text(original)
        assert stale == expected, f"editing {path} makes {sorted(stale)} stale, expected {sorted(expected)}"
    assert json.loads(sh(DVC, "status", "--json", cwd=repo).strip() or "{}") == {}


# ------------------------------------------------------------------------------------- real dvc runs


def sh(*cmd: str, cwd: Path) -> str:
    env = {**clean_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "COLUMNS": "200"}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


@pytest.fixture
def repo(tmp_path, shared_data) -> Path:
    """A copy of the project's pipeline in a fresh git + DVC repo, with small params."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "pipeline", "data/raw"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if src.is_dir() else {}))
    (repo / "data" / "raw" / "corpus.txt").write_text((shared_data / "tinyshakespeare.txt").read_text()[:60_000])
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"]["source"] = {"kind": "files", "path": "data/raw/corpus.txt", "separator": "\n\n"}
    params["tokenize"] = {**params["tokenize"], "kind": "char"}
    params["model"].update(n_layer=1, n_head=2, n_embd=32, block_size=32)
    params["train"].update(max_steps=6, micro_batch_size=4, warmup_steps=1, log_interval=2, eval_interval=3, save_interval=3)
    params["evaluate"].update(hellaswag=str(shared_data / "hellaswag_val_sample.jsonl"), hellaswag_limit=8)
    params["sample"].update(num_samples=1, max_new_tokens=16)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # evaluate.hellaswag names a file: dvc.yaml is rendered again so that it is evaluate's dep.
    sh(str(Path(sys.executable)), "-m", "pipeline.tools.dvc_yaml", cwd=repo)
    sh("git", "init", "-q", cwd=repo)
    sh("git", "config", "user.email", "ci@example.com", cwd=repo)
    sh("git", "config", "user.name", "CI", cwd=repo)
    sh(DVC, "init", "-q", cwd=repo)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")  # the project's: no analytics, linked cache
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "pipeline", cwd=repo)
    return repo


def check_cache(repo: Path) -> dict[Path, int]:
    """Every file in DVC's cache still holds what its name (an md5) says; returns each one's mtime, so a test can
    tell that a later run wrote none of them in place (even with the same bytes)."""
    cache, mtimes = repo / ".dvc" / "cache" / "files" / "md5", {}
    for path in cache.rglob("*"):
        if path.is_file():
            name = path.parent.name + path.name.removesuffix(".dir")
            assert hashlib.md5(path.read_bytes()).hexdigest() == name, f"{path} was changed in place"
            mtimes[path] = path.stat().st_mtime_ns
    return mtimes


@pytest.mark.slow
def test_repro_then_noop_then_partial_rerun_then_an_experiment(repo):
    out = sh(DVC, "repro", cwd=repo)
    for stage in ("prepare", "tokenize", "train", "evaluate", "sample", "report"):
        assert f"Running stage '{stage}'" in out
    assert (repo / "data" / "tokens" / "train-00000.bin").is_file()
    assert (repo / "models" / "final" / "model.safetensors").is_file()
    assert (repo / "reports" / "train" / "plots" / "metrics" / "train" / "loss.tsv").is_file()
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert metrics["val"]["loss"] > 0 and metrics["hellaswag"]["n"] == 8
    for name in ("samples.md", "samples.jsonl", "report.md", "report.html", "plots/loss.png"):
        assert (repo / "reports" / name).is_file(), name
    plots = json.loads(sh(DVC, "plots", "show", "--json", cwd=repo))
    assert {"loss", "learning rate", "throughput (tokens/s)", "gradient norm"} <= set(plots["data"])
    # Val loss against training seconds and FLOPs: x from another file, joined row for row by DVC.
    assert not plots.get("errors"), plots["errors"]
    along = plots["data"]["val loss against seconds in training"][0]["content"]["data"]["values"]
    assert along and all("train_seconds" in row and "loss" in row for row in along)
    # The project's cache.type (reflink, else copy) never links an output to the cache: editing one cannot reach it.
    linked = [p for d in ("data/tokens", "checkpoints", "models") for p in (repo / d).rglob("*") if p.is_file() and p.stat().st_nlink > 1]
    assert not linked, linked[:3]

    out = sh(DVC, "repro", cwd=repo)
    assert "Running stage" not in out
    check_blast_radius(repo)

    # An ordinary in-place edit of an output (as root, as vim or open(..., "w") do): DVC's cache keeps the original,
    # `dvc status` says the output changed, and `dvc checkout --force` puts it back.
    config = repo / "models" / "final" / "config.json"
    original = config.read_bytes()
    with open(config, "w") as f:
        f.write("{}")
    check_cache(repo)
    assert "train" in json.loads(sh(DVC, "status", "--json", cwd=repo))
    sh(DVC, "checkout", "--force", "models/final", cwd=repo)
    assert config.read_bytes() == original and json.loads(sh(DVC, "status", "--json", cwd=repo).strip() or "{}") == {}

    # Identical text gives byte-identical prepare and tokenize outputs, so nothing after them reruns.
    out = sh(DVC, "repro", "-f", "tokenize", cwd=repo)
    assert "Running stage 'prepare'" in out and "Running stage 'tokenize'" in out
    out = sh(DVC, "repro", cwd=repo)
    assert "Running stage" not in out

    # A change that keeps the run: train resumes its last checkpoint, trains no step, and its curves are intact.
    loss_rows = (repo / "reports" / "train" / "plots" / "metrics" / "train" / "loss.tsv").read_text()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["keep_last"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(DVC, "repro", cwd=repo)
    assert "Running stage 'train'" in out and "resuming" in out
    assert (repo / "reports" / "train" / "plots" / "metrics" / "train" / "loss.tsv").read_text() == loss_rows

    # A run that resumes and saves again in the persisted checkpoints folder, among hard links into the cache,
    # writes no file of the cache (DeepSpeed rewrites its recovery scripts on every save).
    before = check_cache(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["max_steps"] = 9
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(DVC, "repro", "train", cwd=repo)
    assert "resuming" in out and "step-000009" in " ".join(p.name for p in (repo / "checkpoints").rglob("step-*"))
    after = check_cache(repo)
    assert {p: after.get(p) for p in before} == before

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tokenize"]["unknown_chars"] = "skip"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(DVC, "repro", cwd=repo)
    assert "Running stage 'prepare'" not in out
    assert "Running stage 'tokenize'" in out and "Running stage 'train'" in out

    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "baseline", cwd=repo)
    sh(DVC, "exp", "run", "-S", "train.lr=3e-5", cwd=repo)
    runs = _runs(_json(sh(DVC, "exp", "show", "--json", cwd=repo)))
    lrs = {run["lr"] for run in runs}
    assert 3e-5 in lrs and 3e-3 in lrs, runs
    assert all(run["loss"] is not None and run["val_loss"] is not None for run in runs), runs
    table = sh(DVC, "exp", "show", "--csv", cwd=repo)
    assert "val.loss" in table.splitlines()[0] and "3e-05" in table


def test_dvc_repro_never_deletes_an_out_dir_gptpipe_did_not_write(repo):
    """DVC removes a stage's outs before running it unless they persist: gptpipe must get to refuse the folder first."""
    (repo / "mine").mkdir()
    (repo / "mine" / "thesis.tex").write_text("three years of work")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"]["out_dir"] = "mine"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**clean_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "COLUMNS": "200"}
    out = subprocess.run([DVC, "repro", "prepare"], cwd=repo, env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "prepare.out_dir: mine holds files gptpipe did not write (thesis.tex)" in " ".join((out.stdout + out.stderr).split())
    assert (repo / "mine" / "thesis.tex").read_text() == "three years of work"


def _json(text: str):
    return json.loads(text[text.index("[") :])


def _runs(shown: list) -> list[dict]:
    """(train.lr, final train loss) of the baseline and each experiment in `dvc exp show --json`."""
    runs = []
    for commit in shown:
        for entry in [commit, *[e for exp in commit.get("experiments") or [] for e in exp.get("revs", [])]]:
            data = (entry.get("data") or {})
            params = data.get("params", {}).get("params.yaml", {}).get("data", {})
            train = data.get("metrics", {}).get("reports/train/metrics.json", {}).get("data", {})
            evaluation = data.get("metrics", {}).get("reports/metrics.json", {}).get("data", {})
            if params:
                runs.append(
                    {"lr": float(params["train"]["lr"]), "loss": train.get("train", {}).get("loss"), "val_loss": evaluation.get("val", {}).get("loss")}
                )
    return runs


def out_hashes(lock: dict, stage: str) -> dict[str, str]:
    """The cached outputs' hashes (metrics such as reports/tokenize.json hold timings and are not compared)."""
    return {o["path"]: o["md5"] for o in lock["stages"][stage]["outs"] if o["path"].startswith("data/")}


@pytest.mark.slow
def test_the_committed_lock_holds_the_hashes_the_default_pipeline_makes(tmp_path):
    """A fresh clone's `make repro` must find prepare and tokenize up to date with dvc.lock, not rewrite them."""
    repo = tmp_path / "clone"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", "pipeline", "data"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "prepared", "tokens", "cache"))
        else:
            shutil.copy(src, repo / name)
    sh("git", "init", "-q", cwd=repo)
    sh(DVC, "init", "-q", cwd=repo)
    sh(DVC, "repro", "tokenize", cwd=repo)
    committed = yaml.safe_load((ROOT / "dvc.lock").read_text())
    made = yaml.safe_load((repo / "dvc.lock").read_text())
    for stage in ("prepare", "tokenize"):
        # The builtin corpus is this Python's own help text, so the lock belongs to the Python that wrote it.
        assert out_hashes(made, stage) == out_hashes(committed, stage), (
            f"{stage}'s outputs differ from dvc.lock (Python {sys.version.split()[0]}): run `make repro` and commit dvc.lock"
        )


# ---------------------------------------------------------------------------------- params a stage reads

# Read by a stage but never part of what it writes, so no rerun should follow a change: how long a process waits
# for the others before it gives up (train declares the whole section anyway).
READ_WITHOUT_EFFECT = {"train.collective_timeout"}


def test_each_stage_declares_every_param_it_reads(tmp_path, monkeypatch, shared_data):
    """Run the six stage commands on a tiny project, recording every params key each one reads after loading its
    params; each key must be declared in its dvc.yaml entry (a section or the key) or reach it through ${...}."""
    import importlib

    from typer.testing import CliRunner

    from pipeline import params
    from pipeline.cli import app
    from pipeline.config.base import Section

    (tmp_path / "corpus.txt").write_text((shared_data / "tinyshakespeare.txt").read_text()[:20_000])
    raw = {
        "prepare": {"source": {"kind": "files", "path": "corpus.txt", "separator": "\n\n"}},
        "tokenize": {"kind": "char"},
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16},
        "train": {"max_steps": 2, "micro_batch_size": 2, "warmup_steps": 0, "eval_interval": 2, "save_interval": 2,
                  "hellaswag_interval": 2, "hellaswag_limit": 2, "sample_interval": 2, "sample_max_new_tokens": 4},
        "evaluate": {"hellaswag": str(shared_data / "hellaswag_val_sample.jsonl"), "hellaswag_limit": 2, "max_windows": 4},
        "sample": {"num_samples": 1, "max_new_tokens": 4},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)

    reads: set[str] = set()
    paths: dict[int, str] = {}

    def register(section: Section, prefix: str) -> None:
        paths[id(section)] = prefix
        for name in type(section).model_fields:
            value = section.__dict__.get(name)
            if isinstance(value, Section):
                register(value, f"{prefix}.{name}" if prefix else name)

    def recording(self, name):
        value = object.__getattribute__(self, name)
        prefix = paths.get(id(self))
        if prefix is not None and name in type(self).model_fields and not isinstance(value, Section):
            reads.add(f"{prefix}.{name}" if prefix else name)
        return value

    def loading(*args, **kwargs):
        p = params.load_params(*args, **kwargs)
        register(p, "")
        return p

    monkeypatch.setattr(Section, "__getattribute__", recording)
    runner = CliRunner()
    for name, stage in STAGES.items():
        command = importlib.import_module(f"pipeline.{stage['package']}.command")
        monkeypatch.setattr(command, "load_params", loading)
        reads.clear()
        result = runner.invoke(app, [name], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        paths.clear()
        declared = stage["params"]
        through_paths = {key for entry in [*stage["deps"], *stage.get("outs", {}), *stage.get("metrics", [])]
                         for key in re.findall(r"\$\{([^}]+)\}", entry)}
        missing = sorted(key for key in reads - READ_WITHOUT_EFFECT - through_paths
                         if not any(key == d or key.startswith(d + ".") for d in declared))
        assert reads, f"{name}: no read recorded: the recorder is broken"
        assert not missing, f"stage {name} reads {missing}, which its dvc.yaml entry does not declare"
