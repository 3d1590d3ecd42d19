"""Trust, second pass: nothing a user made is deleted, overwritten or silently replaced by a run (issue 18).

Each test reproduces one way data was lost or corrupted silently, on tiny real runs, and holds the fix.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, logged, run_training, tiny_params


def runs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "checkpoints").iterdir() if p.is_dir())


def test_each_fresh_start_keeps_every_earlier_run(tokens_dir, tmp_path, capfd):
    """`train.resume: never` three times: the first run's checkpoints are still there, each set aside by number."""
    run_training(tiny_params(tokens_dir, tmp_path, max_steps=4, save_interval=4))
    (first,) = runs(tmp_path)
    marker = first / "step-000004" / "state.json"
    first_state = marker.read_text()
    capfd.readouterr()
    for _ in range(2):
        run_training(tiny_params(tokens_dir, tmp_path, max_steps=4, save_interval=4, resume="never"))
    out = capfd.readouterr().out
    names = [p.name for p in runs(tmp_path)]
    assert names == [first.name, f"{first.name}.previous", f"{first.name}.previous.2"], names
    # The oldest run is the one set aside first, untouched.
    assert (tmp_path / "checkpoints" / f"{first.name}.previous" / "step-000004" / "state.json").read_text() == first_state
    assert "nothing deleted" in out and f"{first.name}.previous.2" in out
    # A folder set aside holds these very settings: no empty "since ..." reason is given for the fresh start.
    assert "starting fresh in" in out and ": since" not in out


OUTPUT_ON_INPUT = {
    # (params, the corpus path the user has): each output key pointed at an input, or at the folder holding it
    "train.metrics_dir": ({"train": {"metrics_dir": "data/raw"}}, "data/raw/samples.jsonl"),
    "tokenize.metrics_file": ({"tokenize": {"metrics_file": "data/raw/samples.jsonl"}}, "data/raw/samples.jsonl"),
    "evaluate.metrics_file": ({"evaluate": {"metrics_file": "data/raw/samples.jsonl"}}, "data/raw/samples.jsonl"),
    "sample.out_dir": ({"sample": {"out_dir": "data/raw"}}, "data/raw/samples.jsonl"),
    "report.out_dir": ({"report": {"out_dir": "data/raw"}}, "data/raw/report.md"),
    "train.metrics_dir inside the corpus folder": ({"train": {"metrics_dir": "data/raw/metrics"}}, "data/raw"),
}


def test_no_output_path_can_be_an_input_or_inside_an_input_folder(tmp_path, monkeypatch):
    """Each path a stage writes is checked against every input before anything runs: exit 2, the corpus intact."""
    import pytest
    import yaml
    from typer.testing import CliRunner

    from pipeline import params
    from pipeline.cli import app
    from pipeline.errors import UserError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    corpus = tmp_path / "data" / "raw" / "samples.jsonl"
    corpus.write_text("".join(f'{{"text": "document {i}"}}\n' for i in range(50)))
    for case, (overrides, source) in OUTPUT_ON_INPUT.items():
        raw = {"prepare": {"source": {"kind": "files", "path": source}}, **overrides}
        key = case.split()[0]
        with pytest.raises(UserError, match=rf"{key}.*\(an input\)"):
            params.validate_params(raw)
    # Through a real stage command: one message, exit code 2, and the corpus keeps every byte.
    before = corpus.read_bytes()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"prepare": {"source": {"kind": "files", "path": "data/raw/samples.jsonl"}},
                                                           "train": {"metrics_dir": "data/raw"}}))
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 2 and "train.metrics_dir" in result.output and "Traceback" not in result.output
    assert corpus.read_bytes() == before


# ------------------------------------------------------------------------------ tokenize resume (items 1, 6, 12)


class Interrupt(Exception):
    """Stands for the kill: raised from the progress callback once some shards are finished."""


def corpus(tmp_path: Path, shared: Path, store: str) -> tuple[Path, Path]:
    """A 60 KB slice of tiny Shakespeare prepared with prepare.store (the source file, the prepared folder)."""
    from pipeline.config.prepare import PrepareConfig
    from pipeline.prepare.stage import prepare_corpus

    source = tmp_path / "raw" / "corpus.txt"
    source.parent.mkdir()
    source.write_text((shared / "tinyshakespeare.txt").read_text()[:60_000])
    cfg = PrepareConfig.model_validate({"source": {"kind": "files", "path": str(source), "separator": "\n\n"}, "store": store,
                                        "out_dir": str(tmp_path / "prepared")})
    prepare_corpus(cfg)
    return source, tmp_path / "prepared"


def tokenize(prepared: Path, out: Path, stop_after_shards: int | None = None):
    """tokenize_corpus with small shards; interrupted (its .partial folder left) once enough shards are finished."""
    from pipeline.config.tokenize import TokenizeConfig
    from pipeline.tokenize.stage import tokenize_corpus

    cfg = TokenizeConfig(kind="tiktoken", out_dir=str(out), shard_tokens=1024, chunk_bytes=1024, workers=1)
    partial = out.with_name(f".{out.name}.partial")

    def progress(_: int) -> None:
        if stop_after_shards and len(list(partial.glob("train-*.bin"))) >= stop_after_shards and (partial / "progress.json").is_file():
            raise Interrupt

    if stop_after_shards:
        import pytest

        with pytest.raises(Interrupt):
            tokenize_corpus(cfg, prepared, progress=progress)
        return partial
    return tokenize_corpus(cfg, prepared)


def contents(folder: Path) -> dict[str, str]:
    """Every file of a folder by its sha256: equal for byte-identical folders."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(folder.rglob("*")) if p.is_file()}


def damage_finished_shard(partial: Path) -> None:
    shard = partial / "train-00001.bin"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40  # one id changed, the header (and its CRC) left as it was
    shard.write_bytes(bytes(data))


def damage_partial_shard(partial: Path) -> None:
    (tmp,) = partial.glob("train-*.bin.tmp")
    data = bytearray(tmp.read_bytes())
    data[70] ^= 0x01
    tmp.write_bytes(bytes(data))


def swap_shards(partial: Path) -> None:
    a, b = partial / "train-00000.bin", partial / "train-00001.bin"
    a.rename(partial / "swap")
    b.rename(a)
    (partial / "swap").rename(b)


def edit_progress(partial: Path) -> None:
    import json

    state = json.loads((partial / "progress.json").read_text())
    state["train"]["position"] += 3  # three documents would be skipped
    (partial / "progress.json").write_text(json.dumps(state))


def stray_temporary(partial: Path) -> None:
    (partial / ".progress.json.k1ll3d.tmp").write_text('{"identity": ')


RESUME_DAMAGE = {"a finished shard with a flipped id": damage_finished_shard, "a partial shard with a flipped byte": damage_partial_shard,
                 "two finished shards swapped": swap_shards, "a position edited in progress.json": edit_progress,
                 "a temporary file a kill left": stray_temporary}


def test_a_damaged_interrupted_tokenize_is_never_resumed_into_the_output(tmp_path, shared_data):
    """Each damage to what an interrupted run left: the rerun's output is byte-identical to a run never interrupted."""
    _, prepared = corpus(tmp_path, shared_data, "text")
    tokenize(prepared, tmp_path / "reference")
    reference = contents(tmp_path / "reference")
    for n, (case, damage) in enumerate(RESUME_DAMAGE.items()):
        out = tmp_path / f"out{n}"
        partial = tokenize(prepared, out, stop_after_shards=3)
        damage(partial)
        tokenize(prepared, out)
        assert contents(out) == reference, case
        assert not partial.exists(), case


def test_a_source_edited_then_restored_does_not_keep_shards_of_the_edit(tmp_path, shared_data):
    """prepare.store: index: tokenize reads the sources again. An edit after prepare stops it (after some shards were
    finished from the edited text); the user restores the file and reruns: the output is that of the restored text."""
    import pytest

    from pipeline.errors import UserError

    source, prepared = corpus(tmp_path, shared_data, "index")
    tokenize(prepared, tmp_path / "reference")
    reference = contents(tmp_path / "reference")
    original = source.read_text()
    source.write_text(original.replace("First Citizen", "First Senator", 1))  # same documents, other text
    with pytest.raises(UserError, match="the source changed"):
        tokenize(prepared, tmp_path / "out")
    assert list((tmp_path / ".out.partial").glob("train-*.bin")), "no shard of the edited text was kept: the case is not reproduced"
    source.write_text(original)
    tokenize(prepared, tmp_path / "out")
    assert contents(tmp_path / "out") == reference


# ------------------------------------------------------------------------------ the wait for a conversion (item 9)

HOLD_HEARTBEAT = """
import sys, time
from pathlib import Path
from pipeline.checkpoints.elastic import heartbeat
with heartbeat(Path(sys.argv[1]), every_s=0.2):
    time.sleep(600)
"""


def heartbeat_process(alive: Path) -> subprocess.Popen:
    """A real process in rank 0's place, converting (it beats) for ten minutes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_HEARTBEAT, str(alive)], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not alive.is_file():
        assert time.monotonic() < deadline and proc.poll() is None, "the heartbeat never started"
        time.sleep(0.05)
    return proc


def test_a_rank_waiting_on_a_frozen_rank_0s_conversion_ends_with_a_message(tmp_path):
    """SIGSTOP on rank 0 mid-conversion: the others stop waiting once it has shown no sign of life for the
    collective timeout, saying it is frozen, instead of waiting forever; a slow but live rank 0 is waited for."""
    from pipeline.checkpoints.elastic import wait_for_conversion
    from pipeline.errors import UserError

    out, alive, failed = tmp_path / "universal" / "step-000008", tmp_path / "universal" / ".step-000008.alive", tmp_path / "f"
    stamp = {"step": "step-000008", "checksums_sha256": "0" * 64}
    proc = heartbeat_process(alive)
    try:
        # Alive: a wait longer than the timeout ends only because the conversion lands (written here after 3 s).
        def land() -> None:
            time.sleep(3)
            out.mkdir(parents=True)
            (out / "source.json").write_text(json.dumps(stamp))
            (out / "checksums.json").write_text("{}")

        threading.Thread(target=land).start()
        started = time.monotonic()
        wait_for_conversion(out, stamp, failed, alive, timeout_s=2, size_gb=0.0, poll_s=0.1)
        assert 2.5 < time.monotonic() - started < 30
        shutil.rmtree(out)

        os.kill(proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(UserError, match=r"rank 0 converting step-000008 .* showed no sign of life for \d+ s \(train.collective_timeout=2\): it is frozen"):
            wait_for_conversion(out, stamp, failed, alive, timeout_s=2, size_gb=0.0, poll_s=0.1)
        assert time.monotonic() - started < 10
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------ symlinked outputs (item 10)


def test_a_symlinked_out_dir_is_written_through_its_link(tmp_path, shared_data):
    """data/tokens -> /big/disk/tokens: every run writes into the target and the link stays a link (an older
    gptpipe replaced it by a folder on the wrong disk and failed on every later run); nothing is left beside it."""
    import pytest

    from pipeline.errors import UserError

    _, prepared = corpus(tmp_path, shared_data, "text")
    tokenize(prepared, tmp_path / "reference")
    reference = contents(tmp_path / "reference")
    big = tmp_path / "big" / "tokens"
    big.parent.mkdir()
    link = tmp_path / "data" / "tokens"
    link.parent.mkdir()
    link.symlink_to(big)  # the target does not exist yet: the first run makes it
    (link.parent / ".tokens.old").symlink_to(big)  # what the older gptpipe left: a link, removed without following it
    for _ in range(3):
        tokenize(prepared, link)
        assert link.is_symlink() and contents(big) == reference
    assert [p.name for p in link.parent.iterdir()] == ["tokens"] and [p.name for p in big.parent.iterdir()] == ["tokens"]

    unmounted = tmp_path / "data" / "elsewhere"
    unmounted.symlink_to(tmp_path / "unmounted" / "tokens")
    with pytest.raises(UserError, match=r"tokenize.out_dir: .*elsewhere is a link to .*unmounted/tokens, whose folder .* does not exist"):
        tokenize(prepared, unmounted)
    assert unmounted.is_symlink() and not (tmp_path / "unmounted").exists()


# ------------------------------------------------------------------------------ one run per output (item 11)

TOKENIZE_IN_A_PROCESS = """
import sys
from pipeline.config.tokenize import TokenizeConfig
from pipeline.tokenize.stage import tokenize_corpus
tokenize_corpus(TokenizeConfig(kind="tiktoken", out_dir=sys.argv[2], shard_tokens=1024, chunk_bytes=1024, workers=1), sys.argv[1])
"""


def test_two_runs_into_one_output_the_second_gets_one_message(tmp_path, shared_data):
    """A tokenize is stopped (SIGSTOP) while it writes data/tokens; a second one into the same folder is refused by
    name, and the first, continued, finishes with the output a lone run gives. A killed run's lock is no lock."""
    import pytest

    from pipeline.errors import UserError

    _, prepared = corpus(tmp_path, shared_data, "text")
    tokenize(prepared, tmp_path / "reference")
    out, lock = tmp_path / "data" / "tokens", tmp_path / "data" / ".tokens.lock"
    first = subprocess.Popen([sys.executable, "-c", TOKENIZE_IN_A_PROCESS, str(prepared), str(out)], cwd=ROOT, env={**os.environ})
    try:
        deadline = time.monotonic() + 120
        while not lock.is_file() or not lock.read_text():
            assert time.monotonic() < deadline and first.poll() is None, "the first run never took its lock"
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGSTOP)
        with pytest.raises(UserError, match=rf"tokenize.out_dir: .*tokens is being written by another gptpipe run \(pid {first.pid} on"):
            tokenize(prepared, out)
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=120) == 0
    finally:
        first.kill()
        first.wait()
    assert contents(out) == contents(tmp_path / "reference") and not lock.exists()

    # The same run killed while it holds the lock: its file stays, its lock does not.
    killed = subprocess.Popen([sys.executable, "-c", TOKENIZE_IN_A_PROCESS, str(prepared), str(tmp_path / "again")], cwd=ROOT)
    while not (tmp_path / ".again.lock").is_file() and killed.poll() is None:
        time.sleep(0.005)
    killed.kill()
    killed.wait()
    tokenize(prepared, tmp_path / "again")
    assert contents(tmp_path / "again") == contents(tmp_path / "reference")


HOLD_LOCK = """
import sys, time
from pipeline.files import folder_lock
with folder_lock(sys.argv[1], "train.out_dir", inside=True):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_training_into_a_busy_out_dir_moves_nothing(tokens_dir, tmp_path):
    """While another training holds train.out_dir, a run with train.resume=never is refused before it sets the
    earlier run aside or writes anything."""
    import pytest

    from pipeline.errors import UserError

    raw = tiny_params(tokens_dir, tmp_path, max_steps=2, save_interval=2)
    run_training(raw)
    listing = lambda: sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name != ".gptpipe.lock")  # noqa: E731
    before = listing()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "checkpoints")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=r"train.out_dir: .*checkpoints is being written by another gptpipe run"):
            run_training({**raw, "train": {**raw["train"], "resume": "never"}})
    finally:
        holder.kill()
        holder.wait()
    assert listing() == before  # the killed holder's lock file aside
    run_training({**raw, "train": {**raw["train"], "resume": "never"}})  # free again


# ------------------------------------------------------------------------------ one message, not a traceback (items 13, 14)


def gptpipe(*args: str, cwd: Path, monkeypatch) -> object:
    """The command line, in this process (a user's mistake must end in SystemExit(2) with one line, not an exception)."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, list(args))


def one_message(result, pattern: str) -> None:
    """Exit code 2, no traceback, the message matching pattern (a CliRunner result or a finished process)."""
    import re

    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    text = result.output if hasattr(result, "exit_code") else result.stderr
    assert code == 2, (code, text[-2000:], getattr(result, "exception", None))
    assert "Traceback" not in text, text[-2000:]
    assert re.search(pattern, " ".join(text.split())), text


def test_paths_of_the_wrong_kind_are_one_message_naming_them(tmp_path, monkeypatch):
    """gptpipe init on a file, under a file, where nothing can be made; recipe use --params a folder; a file, a
    folder and a FIFO where the other is expected: each said as it is ("not found" only when nothing is there)."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    one_message(gptpipe("init", "afile", cwd=tmp_path, monkeypatch=monkeypatch), r"afile is a file: gptpipe init makes a new project")
    one_message(gptpipe("init", "afile/project", cwd=tmp_path, monkeypatch=monkeypatch), r"cannot create afile/project: afile is a file")
    one_message(gptpipe("init", "/proc/gptpipe-project", cwd=tmp_path, monkeypatch=monkeypatch), r"cannot create /proc/gptpipe-project: ")
    one_message(gptpipe("recipe", "use", "shakespeare-char", "--params", "folder", cwd=tmp_path, monkeypatch=monkeypatch),
                r"--params folder is a folder: name the params file to write \(e.g. folder/params.yaml\)")
    assert list((tmp_path / "folder").iterdir()) == []
    one_message(gptpipe("train", "--params", "fifo", cwd=tmp_path, monkeypatch=monkeypatch), r"fifo: params file is not a regular file \(a FIFO, socket or device\)")
    one_message(gptpipe("train", "--params", "folder", cwd=tmp_path, monkeypatch=monkeypatch), r"folder: params file is a folder, not a file")
    one_message(gptpipe("sample", "--model", "afile", cwd=tmp_path, monkeypatch=monkeypatch), r"afile is a file, not a folder")
    one_message(gptpipe("sample", "--model", "fifo", cwd=tmp_path, monkeypatch=monkeypatch), r"fifo is a file, not a folder")


def test_a_pickle_weights_file_is_refused_by_name(tmp_path, monkeypatch):
    """A Hugging Face folder whose pytorch_model.bin is a pickle that would run code, given to sample --model."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "model"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=300, n_positions=32)).save_pretrained(folder)
    (folder / "model.safetensors").unlink()

    class Exploit:
        def __reduce__(self):
            return (exec, ("open('PWNED', 'w')",))

    torch.save({"transformer.wte.weight": Exploit()}, folder / "pytorch_model.bin")
    one_message(gptpipe("sample", "--model", "model", cwd=tmp_path, monkeypatch=monkeypatch),
                r"refused to load pytorch_model.bin: it holds exec, which loading would run as code \(none ran\)")
    assert not (tmp_path / "PWNED").exists()


def test_launcher_settings_that_cannot_work_are_refused_before_launching(tmp_path, monkeypatch):
    """A malformed train.include, a host or slot the hostfile lacks, and a busy master_port: one message each
    (with launcher: deepspeed) and a failed check in doctor, before any process starts."""
    import socket

    import yaml

    (tmp_path / "hostfile").write_text("worker-1 slots=2\nworker-2 slots=2\n")
    cases = {
        "localhost:a": (None, r"train.include: 'localhost:a' is not the launcher's HOST\[:SLOT,...\]"),
        "worker-3:0": ("hostfile", r"train.include: worker-3 is not in the hostfile \(worker-1, worker-2\)"),
        "worker-1:2": ("hostfile", r"train.include: worker-1:2: the hostfile gives worker-1 slots=2 \(slots 0-1\)"),
        "gpu-9": (None, r"train.include: gpu-9 is not this machine: without train.hostfile"),
    }
    for include, (hostfile, message) in cases.items():
        train = {"launcher": "deepspeed", "include": include, **({"hostfile": hostfile} if hostfile else {})}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": train}))
        one_message(gptpipe("train", cwd=tmp_path, monkeypatch=monkeypatch), message)
        if "not the launcher's" not in message:
            doctor = gptpipe("doctor", *(["--hostfile", hostfile] if hostfile else []), cwd=tmp_path, monkeypatch=monkeypatch)
            assert "include/exclude" in doctor.output and message.split(": ", 1)[1][:20].replace("\\", "") in " ".join(doctor.output.split()), doctor.output

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"launcher": "deepspeed", "master_port": port}}))
        one_message(gptpipe("train", cwd=tmp_path, monkeypatch=monkeypatch), rf"train.master_port: {port} is in use on this machine")
        # By hand (deepspeed --master_port, or any launcher): the rendezvous itself says so.
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
               "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
        by_hand = subprocess.run([sys.executable, "-m", "pipeline.train", "--params", "params.yaml"], cwd=tmp_path, env=env,
                                 capture_output=True, text=True)
        one_message(by_hand, rf"the rendezvous port {port} .* is in use on this machine")


def test_a_run_name_dvc_writes_as_a_number_is_a_name(tokens_dir, tmp_path):
    """`dvc exp run -S train.run_name=123` writes run_name: 123 (an int in YAML): it names the folder 123."""
    import yaml

    from pipeline.params import load_params

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(tokens_dir, tmp_path, max_steps=2)).replace("train:\n", "train:\n  run_name: 123\n", 1))
    p = load_params(tmp_path / "params.yaml")
    assert p.train.run_name == "123"
    run_training(p.model_dump())
    assert (tmp_path / "checkpoints" / "123" / "step-000002").is_dir()


# ------------------------------------------------------------------------------ W&B offline after a kill (item 8)


def test_a_killed_offline_wandb_run_gets_its_curve_back_on_resume(tokens_dir, tmp_path, monkeypatch):
    """SIGKILL after the checkpoint at step 4, W&B offline: the killed run's .wandb file holds nothing W&B had not
    flushed; the resumed run's file holds steps 1-4 again (from the restored curve), then its own."""
    import yaml

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    raw = tiny_params(tokens_dir, tmp_path, max_steps=400, decay_steps=8, save_interval=4, log_interval=1, eval_interval=4,
                      loggers=["dvclive", "wandb"], run_name="r")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", "--params", "params.yaml"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = tmp_path / "checkpoints" / "r" / "step-000004" / "checksums.json"
    try:
        deadline = time.monotonic() + 180
        while not done.is_file():
            assert time.monotonic() < deadline and proc.poll() is None, "the run never saved step 4"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    first = {p: p.read_bytes() for p in (tmp_path / "metrics" / "wandb").glob("offline-run-*/run-*.wandb")}
    run_training({**raw, "train": {**raw["train"], "max_steps": 8}})
    losses = logged(tmp_path, "train/loss")
    (record,) = [p for p in (tmp_path / "metrics" / "wandb").glob("offline-run-*/run-*.wandb") if p not in first]
    deadline = time.monotonic() + 30  # W&B's service process may still be writing when finish() returns
    while json.dumps(losses[-1]).encode() not in record.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    data = record.read_bytes()
    assert all(json.dumps(loss).encode() in data for loss in losses[:4]), "steps 1-4 are not in the resumed run's W&B file"
    assert json.dumps(losses[-1]).encode() in data
