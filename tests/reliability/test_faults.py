"""Faults while training: a full disk during a checkpoint or the export, a frozen rank, a killed rank, and
SIGKILL at any moment (during checkpoint writes included). Each ends in one message or a resume that is exact."""

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import clean_env, exported_weights, launch, run_training, tiny_params

from pipeline.errors import UserError


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@contextmanager
def small_disk(path: Path, size: str = "4m"):
    """A real tmpfs of `size` at path (needs root, as CI has); skips where mounting is not allowed."""
    path.mkdir(parents=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip()}); test_an_injected_enospc covers the same path")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill the disk but `leave` bytes; returns the filler file."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(free - leave, 0))
    return filler


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_is_one_message_and_the_run_resumes_exactly(tokens_dir, tmp_path):
    reference = tmp_path / "reference"
    run_training(tiny_params(tokens_dir, reference, max_steps=8, save_interval=4))
    with small_disk(tmp_path / "disk") as disk:
        # The run as a kill after step 4 leaves it, on the small disk, which then fills up.
        shutil.copytree(reference / "checkpoints", disk / "checkpoints")
        (run,) = (disk / "checkpoints").glob("run-*")
        shutil.rmtree(run / "step-000008")
        (run / "latest").write_text("step-000004")
        filler = fill(disk, leave=32 << 10)
        raw = tiny_params(tokens_dir, tmp_path, max_steps=8, save_interval=4, out_dir=str(disk / "checkpoints"))
        with pytest.raises(UserError, match=r"could not write .*: no space left on the device while saving .*step-000008; the"
                                             r" incomplete checkpoint was removed and a rerun resumes from .*step-000004"):
            run_training(raw)
        assert not (run / "step-000008").exists()
        filler.unlink()
        run_training(raw)
    assert_same_weights(exported_weights(tmp_path), exported_weights(reference))


@pytest.mark.slow
def test_a_full_disk_during_the_export_keeps_the_previous_export(tokens_dir, tmp_path):
    with small_disk(tmp_path / "disk", size="2m") as disk:
        raw = tiny_params(tokens_dir, tmp_path, max_steps=4, save_interval=4, export_dir=str(disk / "final"))
        run_training(raw)
        before = {p.name: p.read_bytes() for p in (disk / "final").iterdir() if p.is_file()}
        fill(disk, leave=16 << 10)
        raw["train"]["max_steps"] = 8
        with pytest.raises(UserError, match=r"no space left on the device while exporting to train.export_dir; the previous"
                                             r" export \(if any\) is unchanged and the last checkpoint is complete"):
            run_training(raw)
        assert {p.name: p.read_bytes() for p in (disk / "final").iterdir() if p.is_file()} == before
        assert not [p for p in disk.iterdir() if p.name.startswith(".final.")]  # no half-built export left


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "no space left on the device"), (errno.EACCES, "permission denied"),
                                          (errno.EDQUOT, "disk quota exceeded")])
def test_an_injected_write_error_during_a_checkpoint_removes_the_partial_folder(tokens_dir, tmp_path, monkeypatch, code, reason):
    """The same fault without a small disk (and the faults no tmpfs gives a root user): the file system's error
    raised from torch.save halfway through a file."""
    real_save = torch.save

    def failing_disk(obj, f, *args, **kwargs):
        if "step-000008" in str(f):
            Path(f).write_bytes(b"half a checkpoint")
            raise OSError(code, os.strerror(code), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_disk)
    with pytest.raises(UserError, match=rf"{reason} while saving .*step-000008.*resumes from .*step-000004"):
        run_training(tiny_params(tokens_dir, tmp_path, max_steps=8, save_interval=4))
    (run,) = (tmp_path / "checkpoints").glob("run-*")
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000004"]
    assert (run / "latest").read_text() == "step-000004"


# ---------------------------------------------------------------------------------- two processes


class Output:
    """A process's combined output, read on a thread so the test can wait for a line with a deadline."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
        self.thread.start()

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n" + "".join(self.lines)[-3000:]
            time.sleep(0.05)

    @property
    def text(self) -> str:
        return "".join(self.lines)


def rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if f"--local_rank={rank}" in child.cmdline():
                    return child.pid
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} never started")


def two_ranks(tokens_dir: Path, tmp_path: Path, port: int, timeout: int) -> subprocess.Popen:
    raw = tiny_params(tokens_dir, tmp_path, max_steps=100_000, log_interval=1, eval_interval=10_000, save_interval=10_000,
                      collective_timeout=timeout)
    return launch(["--num_gpus", "2", "--master_port", str(port)], raw, tmp_path)


@pytest.mark.slow
def test_a_frozen_rank_ends_the_job_with_a_message_naming_the_rank_and_step(tokens_dir, tmp_path):
    timeout = 10
    proc = two_ranks(tokens_dir, tmp_path, 29671, timeout)
    out = Output(proc)
    try:
        out.wait_for("step      3 |", timeout=120)
        frozen = rank_pid(proc, 1)
        os.kill(frozen, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            proc.wait(timeout=timeout + 90)
        except subprocess.TimeoutExpired:
            raise AssertionError("the job did not end:\n" + out.text[-3000:]) from None
        out.thread.join(timeout=10)
        waited = time.monotonic() - stopped
    finally:
        for child in psutil.Process().children(recursive=True):
            child.kill()
    assert proc.returncode != 0
    assert timeout <= waited < timeout + 90
    text = " ".join(out.text.split())
    assert f"train: rank 1 did not answer for more than train.collective_timeout={timeout} s: it is frozen" in text, out.text[-3000:]
    assert "at step" in text and "(seen by rank 0)" in text


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_within_seconds(tokens_dir, tmp_path):
    proc = two_ranks(tokens_dir, tmp_path, 29681, timeout=600)
    out = Output(proc)
    try:
        out.wait_for("step      3 |", timeout=120)
        os.kill(rank_pid(proc, 1), signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=60)
        ended = time.monotonic() - killed
    finally:
        for child in psutil.Process().children(recursive=True):
            child.kill()
    assert proc.returncode != 0 and ended < 30, out.text[-2000:]


# ------------------------------------------------------------------------------------ SIGKILL trials

KILL_TRIALS = 12


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_ends_bit_identical(tokens_dir, tmp_path):
    """A run killed again and again (half the kills aimed at a checkpoint being written), then finished,
    ends with exactly the weights of a run never interrupted."""
    settings = dict(max_steps=200, save_interval=2, keep_last=2, log_interval=1, eval_interval=20, model={"dropout": 0.1})
    run_training(tiny_params(tokens_dir, tmp_path / "reference", **settings))
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "params.yaml").write_text(yaml.safe_dump(tiny_params(tokens_dir, killed, **settings)))
    cmd = [sys.executable, "-m", "pipeline.train", "--params", str(killed / "params.yaml")]
    rng = random.Random(1234)
    mid_save = trials = 0
    for trial in range(KILL_TRIALS):
        stale = set(partial_checkpoints(killed))  # left by an earlier kill: not a write of this trial
        proc = subprocess.Popen(cmd, cwd=killed, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env())
        out = Output(proc)
        out.wait_for("train: ", timeout=120)  # resumed or started: the loop is about to run
        if trial % 2 == 0:  # aim: kill as soon as a new checkpoint folder is being written
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not set(partial_checkpoints(killed)) - stale:
                time.sleep(0.0005)
        else:  # anywhere: a seeded delay
            time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is not None:
            break  # it finished before the kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        trials += 1
        mid_save += bool(set(partial_checkpoints(killed)) - stale)
    subprocess.run(cmd, cwd=killed, env=clean_env(), check=True, capture_output=True)
    assert trials >= 10, f"only {trials} kills landed before the run finished"
    assert mid_save >= 2, f"{mid_save} of {trials} kills landed during a checkpoint write"
    assert_same_weights(exported_weights(killed), exported_weights(tmp_path / "reference"))
    print(f"{trials} SIGKILLs, {mid_save} during a checkpoint write: bit-identical")


def partial_checkpoints(root: Path) -> list[Path]:
    return [d for d in (root / "checkpoints").glob("run-*/step-*") if not (d / "checksums.json").exists()]
