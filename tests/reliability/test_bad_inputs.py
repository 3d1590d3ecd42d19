"""Bad inputs and mistakes, each one message and exit code 2 before anything is written or deleted:
damaged token files, outputs pointed at inputs, a hostfile that smuggles ssh options, absurd numbers,
deeply nested YAML, a precision the machine lacks."""

import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml
from conftest import clean_env, run_training, tiny_params
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import UserError
from pipeline.tokens import HEADER, HEADER_BYTES, open_tokens

runner = CliRunner()


def copy_tokens(tokens_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tokens_dir, tmp_path / "tokens"))


def rewrite_header(path: Path, **fields) -> None:
    """Change header fields (a forger recomputing the CRC passes crc=None to have it recomputed)."""
    data = bytearray(path.read_bytes())
    magic, version, code, vocab, count, crc, eot = HEADER.unpack_from(data)
    values = {"vocab": vocab, "count": count, "crc": crc, "eot": eot, **fields}
    if values["crc"] is None:
        values["crc"] = zlib.crc32(bytes(data[HEADER_BYTES:]))
    HEADER.pack_into(data, 0, magic, version, code, values["vocab"], values["count"], values["crc"], values["eot"])
    path.write_bytes(bytes(data))


def set_token(path: Path, index: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, HEADER_BYTES + 2 * index, value)
    path.write_bytes(bytes(data))


TOKEN_DAMAGE = {
    "rewritten tokens": (lambda t: set_token(t / "train-00000.bin", 100, 7), r"train-00000.bin: corrupt: crc32 of the tokens is"),
    "an id past the vocabulary, CRC forged": (
        lambda t: (set_token(t / "train-00000.bin", 100, 9999), rewrite_header(t / "train-00000.bin", crc=None)),
        r"train-00000.bin: holds token id 9999, not below the header's vocab_size"),
    "meta.json with a smaller vocabulary": (
        lambda t: (t / "meta.json").write_text(json.dumps({**json.loads((t / "meta.json").read_text()), "vocab_size": 40})),
        r"train-00000.bin: the header says vocab_size=63, eot_id=\d+ but .*meta.json says 40"),
    "tokenizer folder missing": (lambda t: shutil.rmtree(t / "tokenizer"), r"tokenizer_meta.json not found"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TOKEN_DAMAGE))
def test_damaged_tokens_stop_training_before_it_starts(tokens_dir, tmp_path, case):
    damage, message = TOKEN_DAMAGE[case]
    tokens = copy_tokens(tokens_dir, tmp_path)
    assert open_tokens(tokens / "train-00000.bin").vocab_size == 63  # what the cases above assume
    damage(tokens)
    with pytest.raises(UserError, match=message):
        run_training(tiny_params(tokens, tmp_path, tokenize={"kind": "char", "out_dir": str(tokens)}))
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics").exists()


def test_damaged_val_tokens_stop_evaluate_before_it_scores(tokens_dir, tmp_path):
    from pipeline import params
    from pipeline.eval.stage import evaluate_model as evaluate

    tokens = copy_tokens(tokens_dir, tmp_path)
    raw = tiny_params(tokens, tmp_path, tokenize={"kind": "char", "out_dir": str(tokens)}, max_steps=2)
    run_training(raw)
    set_token(tokens / "val-00000.bin", 10, 7)
    raw["evaluate"] = {"metrics_file": str(tmp_path / "metrics.json")}
    with pytest.raises(UserError, match=r"val-00000.bin: corrupt: crc32 of the tokens is"):
        evaluate(params.validate_params(raw))
    assert not (tmp_path / "metrics.json").exists()


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "book.txt").write_text("\n\n".join(f"Chapter {i}: it was a dark and stormy night." for i in range(40)))
    (tmp_path / "corpus" / "notes.md").write_text("an unrelated file")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "prepare": {"source": {"kind": "files", "path": "corpus/book.txt", "separator": "\n\n"}},
        "tokenize": {"kind": "char"},
    }))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "override, message",
    [
        ("prepare.out_dir=corpus", r"prepare.out_dir: corpus holds prepare.source.path=corpus/book.txt \(an input\)"),
        ("tokenize.out_dir=data", r"tokenize.out_dir: data holds prepare.out_dir=data/prepared \(another output\)"),
        ("train.export_dir=corpus", r"train.export_dir: corpus holds prepare.source.path"),
    ],
)
def test_an_output_pointed_at_inputs_is_refused_and_nothing_is_deleted(project, override, message):
    assert runner.invoke(app, ["prepare"]).exit_code == 0
    before = snapshot(project)
    stage = override.split(".")[0]
    result = runner.invoke(app, [stage if stage != "train" else "prepare", "-S", override])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(__import__("re").findall(message, " ".join(result.output.split()))) >= 1, result.output
    assert snapshot(project) == before


def test_an_output_reached_through_a_symlink_to_an_input_is_refused(project):
    (project / "shortcut").symlink_to(project / "corpus")
    result = runner.invoke(app, ["prepare", "-S", "prepare.out_dir=shortcut"])
    assert result.exit_code == 2 and "prepare.out_dir" in result.output, result.output
    assert (project / "corpus" / "book.txt").is_file() and (project / "corpus" / "notes.md").is_file()


def test_a_folder_gptpipe_did_not_write_is_never_replaced(project):
    (project / "mine").mkdir()
    (project / "mine" / "thesis.tex").write_text("three years of work")
    result = runner.invoke(app, ["prepare", "-S", "prepare.out_dir=mine"])
    assert result.exit_code == 2
    assert "prepare.out_dir: mine holds files gptpipe did not write (thesis.tex)" in " ".join(result.output.split())
    assert (project / "mine" / "thesis.tex").read_text() == "three years of work"
    assert runner.invoke(app, ["prepare", "-S", "prepare.out_dir=fresh"]).exit_code == 0
    assert runner.invoke(app, ["prepare", "-S", "prepare.out_dir=fresh"]).exit_code == 0  # its own folder: replaced
    # A signature file of an earlier gptpipe (before the marker) counts only in a folder holding nothing else.
    (project / "mine" / "meta.json").write_text("{}")
    assert runner.invoke(app, ["prepare", "-S", "prepare.out_dir=mine"]).exit_code == 2
    assert (project / "mine" / "thesis.tex").is_file()
    (project / "fresh" / ".gptpipe-output").unlink()
    assert runner.invoke(app, ["prepare", "-S", "prepare.out_dir=fresh"]).exit_code == 0


INJECTION = "-oProxyCommand=touch${IFS}pwned slots=1\n"


def test_a_hostfile_cannot_smuggle_ssh_options(project):
    (project / "hostfile").write_text(INJECTION)
    result = runner.invoke(app, ["doctor", "--hostfile", "hostfile"], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "is not a host name or IP address" in result.output
    result = runner.invoke(app, ["train", "-S", "train.launcher=deepspeed", "-S", "train.hostfile=hostfile"])
    assert result.exit_code == 2
    assert "train.hostfile: hostfile:1: '-oProxyCommand=touch${IFS}pwned' is not a host name or IP address" in result.output
    assert not (project / "pwned").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_layer=1e30", "model.n_layer"),
        ("train.seed=9223372036854775808", "train.seed: got 9223372036854775808; input should be less than or equal to 4294967295"),
        ("train.lr=.inf", "train.lr: got inf; input should be a finite number"),
        ("train.micro_batch_size=1e12", "train.micro_batch_size"),
        ("tokenize.chunk_bytes=1e30", "tokenize.chunk_bytes"),
    ],
)
def test_numbers_beyond_what_the_code_holds_are_one_message(project, override, message):
    result = runner.invoke(app, ["train", "-S", override])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_a_shape_too_big_for_this_machine_is_one_message_before_any_allocation(tokens_dir, tmp_path):
    raw = tiny_params(tokens_dir, tmp_path, model={"n_layer": 1024, "n_head": 8, "n_embd": 65536})
    with pytest.raises(UserError, match=r"describe [\d,.]+B parameters: their fp32 weights alone need .* GB free"):
        run_training(raw)


def test_json_nested_too_deeply_in_a_corpus_is_one_message(project):
    (project / "deep.jsonl").write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    result = runner.invoke(app, ["prepare", "-S", "prepare.source.kind=files", "-S", "prepare.source.path=deep.jsonl"])
    assert result.exit_code == 2 and "deep.jsonl:2: JSON nested too deeply" in result.output, result.output


def test_deeply_nested_yaml_is_one_message(project):
    (project / "params.yaml").write_text("train: " + "[" * 10000 + "]" * 10000 + "\n")
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2 and "nested too deeply" in result.output


def test_fp16_where_the_machine_lacks_it_is_refused_before_anything_is_written(tokens_dir, tmp_path):
    """CPUs differ (fp16 needs e.g. AVX512-FP16 for oneDNN): where it is missing, one message and no folder;
    where it is there, the run trains."""
    from deepspeed.accelerator import get_accelerator

    raw = tiny_params(tokens_dir, tmp_path, precision="fp16", max_steps=2)
    if get_accelerator().is_fp16_supported():
        assert run_training(raw)["steps"] == 2
        return
    with pytest.raises(UserError, match=r"train.precision=fp16 is not supported on this machine's \w+ accelerator"):
        run_training(raw)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_fp16_on_an_accelerator_without_it_moves_no_folder(tokens_dir, tmp_path, monkeypatch):
    """The refusal itself, forced on this machine (whose CPU has fp16): resume=never must not have moved the
    earlier run aside before the message."""
    from deepspeed.accelerator import get_accelerator

    run_training(tiny_params(tokens_dir, tmp_path, max_steps=2))
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    raw = tiny_params(tokens_dir, tmp_path, precision="fp16", max_steps=2, resume="never")
    with pytest.raises(UserError, match=r"train.precision=fp16 is not supported on this machine's \w+ accelerator"):
        run_training(raw)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("launched", [False, True])
def test_the_stage_script_prints_one_line_not_a_traceback(project, launched):
    """Also as a process the deepspeed launcher started (its variables set), which leaves by os._exit: the same
    line reaches the stream and the same exit code the launcher."""
    (project / "params.yaml").write_text("train:\n  precision: fp16\n  zero_stage: 7\n")
    env = clean_env()
    if launched:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")
    out = subprocess.run([sys.executable, "-m", "pipeline.train"], capture_output=True, text=True, cwd=project, env=env)
    assert out.returncode == 2 and "train.zero_stage" in out.stderr and "Traceback" not in out.stderr
