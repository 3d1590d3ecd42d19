"""Shared test fixtures: the repo root and the shared data folder beside it, offline settings."""

import os
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
