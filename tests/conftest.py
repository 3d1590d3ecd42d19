"""Shared test fixtures: the repo root, the shared data folder beside it, offline settings, tiny training runs."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Tests never touch the network: tiktoken reads its GPT-2 files from the shared cache, and the
# Hugging Face libraries are told not to look for the hub. Set before anything imports them, and
# inherited by the subprocesses tests start (dvc, the deepspeed launcher).
os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_DATA / "tiktoken_cache")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "tinyshakespeare.txt").is_file():
        pytest.fail(f"shared data not found at {SHARED_DATA}: link the shared/ folder beside the repo")
    return SHARED_DATA


# ------------------------------------------------------------------------------------- tiny training runs

TINY_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}
TINY_TRAIN = {
    "max_steps": 16, "micro_batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "log_interval": 4,
    "eval_interval": 8, "save_interval": 8, "eval_batches": 2, "keep_last": 5,
}  # fmt: skip


@pytest.fixture(scope="session")
def tokens_dir(tmp_path_factory, shared_data) -> Path:
    """Char-level tokens of the first ~100 KB of tiny Shakespeare, split at blank lines."""
    from pipeline.config.prepare import PrepareConfig
    from pipeline.config.tokenize import TokenizeConfig
    from pipeline.prepare.stage import prepare_corpus
    from pipeline.tokenize.stage import tokenize_corpus

    root = tmp_path_factory.mktemp("corpus")
    text = (shared_data / "tinyshakespeare.txt").read_text()[:100_000]
    (root / "corpus.txt").write_text(text)
    prepared = PrepareConfig.model_validate(
        {"source": {"kind": "files", "path": str(root / "corpus.txt"), "separator": "\n\n"}, "out_dir": str(root / "prepared")}
    )
    prepare_corpus(prepared)
    tokenize_corpus(TokenizeConfig(kind="char", out_dir=str(root / "tokens")), root / "prepared")
    return root / "tokens"


def tiny_params(tokens_dir: Path, run_dir: Path, model: dict | None = None, tokenize: dict | None = None, **train) -> dict:
    return {
        "tokenize": tokenize or {"kind": "char", "out_dir": str(tokens_dir)},
        "model": {**TINY_MODEL, **(model or {})},
        "train": {
            **TINY_TRAIN,
            "out_dir": str(run_dir / "checkpoints"),
            "export_dir": str(run_dir / "final"),
            "metrics_dir": str(run_dir / "metrics"),
            **train,
        },
    }


def run_training(raw: dict) -> dict:
    from pipeline import params
    from pipeline.train.loop import train

    return train(params.validate_params(raw))


def logged(run_dir: Path, name: str) -> list[float]:
    with open(run_dir / "metrics" / "plots" / "metrics" / f"{name}.tsv") as f:
        return [float(row[name.split("/")[-1]]) for row in csv.DictReader(f, delimiter="\t")]


def saved_world_size(run: Path) -> int:
    """How many processes saved a run folder's newest checkpoint (its state.json says)."""
    from pipeline.checkpoints.state import TrainState

    return TrainState.read(run / (run / "latest").read_text().strip() / "state.json").world_size


def exported_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "model.safetensors")


# ------------------------------------------------------------------------------- the deepspeed launcher


def clean_env() -> dict:
    """This process's environment without the distributed variables that in-process training set (and with Python's
    fault handler on, so that a process that crashes prints where each of its threads was)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONFAULTHANDLER": "1"}


def launch(args: list[str], params: dict, cwd: Path, module: str = "pipeline.train", **kw) -> subprocess.Popen:
    import yaml

    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed), *args, "--module", module, "--params", str(cwd / "params.yaml")]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env(), **kw)


def finish(proc: subprocess.Popen, timeout: int = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out
