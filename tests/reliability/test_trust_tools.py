"""Trust, third pass: the tools (`gptpipe plan`, `gptpipe recipe`) and prepare on damaged or unusual inputs (issue 29).

Each test reproduces one hang, crash, misleading message or leftover and holds the fix: a user mistake is one line
and exit code 2 naming the file or option, nothing opens a FIFO, and a terminated probe leaves no scratch folder.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import clean_env, tiny_params
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def gptpipe(*args: str, cwd: Path, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command in its own process: one that blocks (on a FIFO) fails the test instead of hanging it."""
    try:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                              env=env or clean_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"gptpipe {' '.join(args)} still running after {timeout} s (blocked?)")


def one_line_error(out: str) -> str:
    assert "Traceback" not in out, out[-3000:]
    (line,) = [line for line in out.splitlines() if line.startswith("error:")]
    return line


def project(tokens_dir: Path, tmp_path: Path, tokenize: dict | None = None, **train) -> Path:
    """A tiny project with its own copy of the tokens (the shared fixture's stay intact); its params.yaml."""
    tokens = tmp_path / "tokens"
    if tokenize is None and not tokens.exists():
        shutil.copytree(tokens_dir, tokens)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(tokens, tmp_path, tokenize=tokenize, **train)))
    return path


# ------------------------------------------------------------------------------------- FIFOs are never opened


@pytest.mark.parametrize("force", [False, True], ids=["plain", "--force"])
def test_recipe_use_refuses_a_fifo_as_params_without_opening_it(tmp_path, force):
    """Defect 7: `recipe use NAME --params FIFO` read the FIFO to see whether it held changes, and blocked forever
    (with --force it replaced the FIFO by a file)."""
    fifo = tmp_path / "params.yaml"
    os.mkfifo(fifo)
    out = gptpipe("recipe", "use", "shakespeare-char", "--params", str(fifo), *(["--force"] if force else []),
                  cwd=tmp_path, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    line = one_line_error(out.stderr)
    assert str(fifo) in line and "FIFO" in line, line
    assert fifo.is_fifo()  # left as the user made it


def test_a_fifo_as_the_prepare_source_is_named_a_fifo_not_a_missing_file(tmp_path):
    """Defect 13: a FIFO as `prepare.source.path` was reported as "no such file or folder"."""
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"prepare": {"source": {"kind": "files", "path": str(fifo)}, "out_dir": str(tmp_path / "prepared")}}))
    out = gptpipe("prepare", cwd=tmp_path, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    line = one_line_error(out.stderr)
    assert "prepare.source.path" in line and "FIFO" in line and "no such file" not in line, line
    assert fifo.is_fifo() and not (tmp_path / "prepared").exists()


# ------------------------------------------------------------------------------ plan: damaged inputs, one line

DAMAGED_META = {
    # meta.json's text -> the key the message must name
    "not JSON": ('{"vocab_size": 65, "eot_id"', "meta.json"),
    "a list": ("[65, 0]", "meta.json"),
    "no vocab_size": ('{"eot_id": 0, "splits": {}}', "vocab_size"),
    "vocab_size a word": ('{"vocab_size": "many", "eot_id": 0}', "vocab_size"),
    "vocab_size zero": ('{"vocab_size": 0, "eot_id": 0}', "vocab_size"),
    "train tokens a word": ('{"vocab_size": 65, "eot_id": 0, "splits": {"train": {"tokens": "lots"}}}', "splits.train.tokens"),
    "splits a list": ('{"vocab_size": 65, "eot_id": 0, "splits": []}', "splits"),
}


@pytest.mark.parametrize("case", DAMAGED_META)
def test_plan_on_a_damaged_meta_json_is_one_message_naming_the_file_and_key(tokens_dir, tmp_path, case):
    """Defect 10: a damaged meta.json crashed plan (JSONDecodeError, KeyError, TypeError, ValueError)."""
    text, key = DAMAGED_META[case]
    params = project(tokens_dir, tmp_path, max_steps=None, epochs=1)  # epochs: plan reads the train split's tokens
    (tmp_path / "tokens" / "meta.json").write_text(text)
    result = runner.invoke(app, ["plan", "--params", str(params)])
    assert result.exit_code == 2, (result.output, result.exception)
    line = one_line_error(result.output)
    assert str(tmp_path / "tokens" / "meta.json") in line and key in line, line


UNKNOWN_TOKENIZERS = {
    "tiktoken": ({"kind": "tiktoken", "encoding": "no_such_encoding"}, "tokenize.encoding"),
    "hf": ({"kind": "hf", "pretrained": "no-such-org/no-such-tokenizer"}, "tokenize.pretrained"),
}


@pytest.mark.parametrize("kind", UNKNOWN_TOKENIZERS)
def test_plan_with_an_unknown_tokenizer_is_one_message_naming_the_key(tokens_dir, tmp_path, kind):
    """Defect 10: before the data is tokenized, plan asks the tokenizer for its vocabulary: an unknown tiktoken
    encoding (ValueError) or HF tokenizer (OSError) crashed it."""
    tokenize, key = UNKNOWN_TOKENIZERS[kind]
    params = project(tokens_dir, tmp_path, tokenize={**tokenize, "out_dir": str(tmp_path / "not-tokenized")})
    result = runner.invoke(app, ["plan", "--params", str(params)])
    assert result.exit_code == 2, (result.output, result.exception)
    line = one_line_error(result.output)
    assert key in line and tokenize.get("encoding", tokenize.get("pretrained")) in line, line


DAMAGED_CONFIGS = {
    # model.init's config.json -> what the message must name
    "no model_type": ('{"n_layer": 2}', "model_type"),
    "an unknown model_type": ('{"model_type": "no-such-arch"}', "no-such-arch"),
    "n_layer a word": ('{"model_type": "gpt2", "n_layer": "two"}', "n_layer"),
}


@pytest.mark.parametrize("case", DAMAGED_CONFIGS)
def test_plan_on_a_damaged_model_config_is_one_message_naming_it(tmp_path, case):
    """Defect 10 (what else plan reads): model.init's config.json with no or an unknown model_type (ValueError) or a
    key of the wrong type (StrictDataclassError) crashed plan; a malformed one already was one message."""
    text, key = DAMAGED_CONFIGS[case]
    model, tokens = tmp_path / "model", tmp_path / "tokens"
    model.mkdir()
    (model / "config.json").write_text(text)
    tokens.mkdir()
    (tokens / "meta.json").write_text('{"vocab_size": 100, "eot_id": 0}')  # tokenized: no tokenizer to load
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"model": {"init": str(model)}, "tokenize": {"kind": "hf", "pretrained": str(model), "out_dir": str(tokens)}}))
    result = runner.invoke(app, ["plan", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2, (result.output, result.exception)
    line = one_line_error(result.output)
    assert "model.init" in line and "config.json" in line and key in line, line


DAMAGED_METRICS = {
    # metrics.json's text -> the key the message must name
    "not JSON": ('{"target": {"loss": 4.0,', "metrics.json"),
    "a list": ("[]", "metrics.json"),
    "target a word": ('{"target": "reached"}', "target"),
    "step a word": ('{"target": {"loss": 4.0, "reached": true, "step": "ten"}}', "target.step"),
}


@pytest.mark.parametrize("case", DAMAGED_METRICS)
def test_plan_with_a_target_on_a_damaged_metrics_json_says_so_before_probing(tokens_dir, tmp_path, case):
    """Defect 10: with train.target_loss, `plan --probe` read the last run's metrics.json after the probe and crashed
    on a damaged one; now it is one message, before the probe spends any time."""
    text, key = DAMAGED_METRICS[case]
    params = project(tokens_dir, tmp_path, target_loss=4.0)
    metrics = tmp_path / "metrics" / "metrics.json"
    metrics.parent.mkdir()
    metrics.write_text(text)
    result = runner.invoke(app, ["plan", "--params", str(params), "--probe", "1"])
    assert result.exit_code == 2, (result.output, result.exception)
    line = one_line_error(result.output)
    assert str(metrics) in line and key in line, line
    assert "probing" not in result.output


@pytest.mark.parametrize("processes", ["-1", "0"])
def test_plan_refuses_processes_below_one(tokens_dir, tmp_path, processes):
    """Defect 13: `--processes -1` printed negative memory and exit 1; `--processes 0` was ignored."""
    params = project(tokens_dir, tmp_path)
    result = runner.invoke(app, ["plan", "--params", str(params), "--processes", processes])
    assert result.exit_code == 2, result.output
    assert "--processes" in result.output and "Traceback" not in result.output and "MB" not in result.output


# --------------------------------------------------------------------- plan --probe: terminated, nothing left


def processes_naming(text: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(text in arg for arg in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_a_terminated_probe_removes_its_scratch_folder_and_its_run(tokens_dir, tmp_path):
    """Defect 13: SIGTERM during `plan --probe` left the scratch folder (and the probe's training process, still
    writing into it). Now the run is stopped and the folder removed before plan exits."""
    params = project(tokens_dir, tmp_path)
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    env = {**clean_env(), "TMPDIR": str(scratch_root)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "plan", "--params", str(params), "--probe", "100000"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while not (scratch := list(scratch_root.glob("gptpipe-probe-*"))) and proc.poll() is None:
            assert time.monotonic() < deadline, "the probe never started"
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        (folder,) = scratch
        while not processes_naming(str(folder)) and time.monotonic() < deadline:
            time.sleep(0.1)  # the probe's training process has started
        time.sleep(2)  # and is running
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode != 0, out[-3000:]
        assert not folder.exists(), list(folder.rglob("*"))
        assert processes_naming(str(folder)) == [], "the probe's training process outlived plan"
        assert "Traceback" not in out, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for leftover in processes_naming(str(scratch_root)):  # an orphaned probe run (the defect): stopped here
            leftover.kill()
