"""The command line: help from the schema, overrides, one-line errors with exit code 2, stage scripts."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder with a small corpus and a params.yaml that reads it."""
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"Document {i}: the quick brown fox, {i * 7} times." for i in range(60)))
    (tmp_path / "params.yaml").write_text(
        "prepare:\n  source: {kind: files, path: corpus.txt, separator: \"\\n\\n\"}\n"
        "tokenize:\n  kind: char\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path


def test_help_lists_each_param_with_its_description():
    result = runner.invoke(app, ["tokenize", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "tokenize.vocab_size = 4096: bpe only: vocabulary size to train" in result.output
    assert "prepare.source" not in result.output  # only the section the stage reads


def test_prepare_and_tokenize_write_outputs_and_a_summary(project):
    result = runner.invoke(app, ["prepare"])
    assert result.exit_code == 0, result.output
    assert "train documents" in result.output
    result = runner.invoke(app, ["tokenize", "-S", "tokenize.workers=2"])
    assert result.exit_code == 0, result.output
    assert "train tokens" in result.output
    meta = json.loads((project / "data" / "tokens" / "meta.json").read_text())
    throughput = json.loads((project / "reports" / "tokenize.json").read_text())
    assert meta["tokenizer"]["kind"] == "char" and throughput["workers"] == 2 and throughput["tokens_per_s"] > 0
    assert sorted(p.name for p in (project / "data" / "tokens").iterdir()) == [".gptpipe-output", "meta.json", "tokenizer", "train-00000.bin", "val-00000.bin"]


def test_overrides_are_validated_like_the_file(project):
    result = runner.invoke(app, ["tokenize", "-S", "tokenize.vocab_sise=4096", "-S", "tokenize.kind=words"])
    assert result.exit_code == 2
    assert "tokenize.vocab_sise: unknown key (did you mean 'vocab_size'?)" in result.output
    assert "tokenize.kind: got 'words'" in result.output
    assert "Traceback" not in result.output


def test_user_mistakes_are_one_message_and_exit_code_2(project):
    (project / "params.yaml").write_text("prepare:\n  source: {kind: files, path: missing.txt}\n")
    result = runner.invoke(app, ["prepare"])
    assert result.exit_code == 2
    assert "missing.txt" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["tokenize"])
    assert result.exit_code == 2 and "run the prepare stage" in result.output.lower()


STAGE_PACKAGES = {"prepare": "prepare", "tokenize": "tokenize", "train": "train", "evaluate": "eval", "sample": "sample", "report": "report"}


@pytest.mark.parametrize("stage", list(STAGE_PACKAGES))
def test_each_stage_runs_as_its_own_module(project, stage):
    # What dvc.yaml runs: `python -m pipeline.<package>`, one command per module (pipeline.tokenize leaves the
    # standard library's `tokenize` alone: nothing puts pipeline/ itself on sys.path).
    env = {**os.environ, "COLUMNS": "200"}
    module = f"pipeline.{STAGE_PACKAGES[stage]}"
    bad = subprocess.run([sys.executable, "-m", module, "-S", f"{stage}.nope=1"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2, bad.stderr
    assert f"{stage}.nope: unknown key" in bad.stderr and "Traceback" not in bad.stderr
    ok = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and f"{stage}." in ok.stdout
