"""Trust, third pass: the models gptpipe reads back (exports, step folders, any Hugging Face folder) when damaged,
planted with code, pruned or of the wrong kind (issue 29).

Each test reproduces one silent load, code run, traceback or misleading message on a tiny real run and holds the
fix: a damaged model is one message naming the file, planted code never runs, nothing is moved before a refusal.
"""

import ast
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, clean_env, run_training, tiny_params
from typer.testing import CliRunner

from pipeline import params
from pipeline import files as pipeline_files
from pipeline.cli import app
from pipeline.errors import UserError
from pipeline.eval.stage import evaluate_model
from pipeline.model.inference import load_for_inference
from pipeline.sample.stage import generate_samples


@pytest.fixture(scope="module")
def trained(tokens_dir, tmp_path_factory) -> Path:
    """A run with checkpoints at steps 4 and 8 and its export (models/final)."""
    root = tmp_path_factory.mktemp("trained")
    run_training(tiny_params(tokens_dir, root, max_steps=8, save_interval=4))
    return root


def run_of(root: Path) -> Path:
    (run,) = (root / "checkpoints").glob("run-*")
    return run


def copy_export(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained / "final", tmp_path / "final"))


def copy_step(trained: Path, tmp_path: Path, tag: str = "step-000008") -> Path:
    """A step folder on its own (a folder named step-*, as a checkpoint handed out is)."""
    return Path(shutil.copytree(run_of(trained) / tag, tmp_path / "handed" / tag))


def reseal(folder: Path, listing: str) -> None:
    """Rewrite a checksum list over every file of the folder, as someone handing out a tampered model would."""
    import hashlib

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != listing)
    (folder / listing).write_text(json.dumps({str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}))


def model_params(tokens_dir: Path, root: Path, init: str | None = None, **train) -> dict:
    raw = tiny_params(tokens_dir, root, max_steps=2, **train)
    if init is not None:
        raw["model"] = {"init": init, "block_size": 32}  # a pretrained model keeps its own shape
    raw["evaluate"] = {"metrics_file": str(root / "eval.json")}
    return raw


def read_model(reader: str, folder: Path, tokens_dir: Path, root: Path) -> None:
    """Load folder as the reader does: training's model.init, evaluate's model_dir, sample's --model."""
    if reader == "train (model.init)":
        run_training(model_params(tokens_dir, root / "run", str(folder)))
    elif reader == "evaluate":
        raw = model_params(tokens_dir, root / "run")
        raw["evaluate"]["model_dir"] = str(folder)
        evaluate_model(params.validate_params(raw))
    else:
        generate_samples(params.validate_params(model_params(tokens_dir, root / "run")), prompts=["hi"], model_dir=str(folder))


READERS = ["train (model.init)", "evaluate", "sample"]


def gptpipe(*args: str, cwd: Path, monkeypatch) -> object:
    """The command line, in this process: a user's mistake ends in exit code 2 with one line."""
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, list(args))


def one_message(result, pattern: str) -> None:
    import re

    assert result.exit_code == 2, (result.exit_code, result.output[-2000:], result.exception)
    assert "Traceback" not in result.output, result.output[-2000:]
    assert re.search(pattern, " ".join(result.output.split())), result.output


# ---------------------------------------------------------------------------------------- 3: exports are sealed


def flip_exponents(path: Path, count: int = 8) -> None:
    """Flip one exponent bit in each of the first count floats of the first tensor: the file still parses."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    name = sorted(k for k in header if k != "__metadata__")[0]
    assert header[name]["dtype"] == "F32"
    start = 8 + n + header[name]["data_offsets"][0]
    for i in range(count):
        data[start + 4 * i + 3] ^= 0x40  # bit 30: the exponent's top bit of a little-endian float32
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("reader", READERS)
def test_a_damaged_export_is_refused_by_every_reader(trained, tokens_dir, tmp_path, reader):
    export = copy_export(trained, tmp_path)
    assert (export / "gptpipe_checksums.json").is_file()
    flip_exponents(export / "model.safetensors")
    with pytest.raises(UserError, match=r"the exported model .*final is damaged: model.safetensors is corrupt"):
        read_model(reader, export, tokens_dir, tmp_path)
    assert not list((tmp_path / "run").glob("checkpoints/run-*"))


def test_an_unsealed_hugging_face_folder_still_loads(trained, tmp_path):
    """A folder without gptpipe's checksums (a hub download, an export of an older gptpipe) loads as it is."""
    export = copy_export(trained, tmp_path)
    (export / "gptpipe_checksums.json").unlink(missing_ok=True)
    flip_exponents(export / "model.safetensors")
    model, tokenizer = load_for_inference(export, key="--model")
    assert tokenizer.kind == "char" and model.get_input_embeddings().weight.shape[0] >= tokenizer.vocab_size


# ------------------------------------------------------------------------------ 5: no code runs unless trusted

PLANTED = """import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast


class EvilConfig(GPT2Config):
    model_type = "evil"


class EvilModel(GPT2LMHeadModel):
    config_class = EvilConfig


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def plant_model_code(folder: Path, marker: Path) -> None:
    """A config.json whose model type only the folder's own evil.py knows (transformers then asks to run it)."""
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(PLANTED.format(marker=str(marker)))


def hf_tokenizer(folder: Path) -> int:
    """A small Hugging Face tokenizer (one id per letter) saved in folder; its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<eos>", *"abcdefghijklmnopqrstuvwxyz "])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>").save_pretrained(folder)
    return len(vocab)


def plant_tokenizer_code(export: Path, marker: Path) -> None:
    """gptpipe_tokenizer/ as an hf-kind tokenizer whose tokenizer_config.json names the folder's own evil.py."""
    tok_dir = export / "gptpipe_tokenizer"
    shutil.rmtree(tok_dir)
    vocab_size = hf_tokenizer(tok_dir)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]})
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (tok_dir / "evil.py").write_text(PLANTED.format(marker=str(marker)))
    meta = {"kind": "hf", "vocab_size": vocab_size, "eot_id": 0, "add_bos": False, "pretrained": "x", "parse_special": False}
    (tok_dir / "tokenizer_meta.json").write_text(json.dumps(meta))


def planted_step(trained: Path, tmp_path: Path, marker: Path) -> Path:
    step = copy_step(trained, tmp_path)
    plant_model_code(step, marker)
    reseal(step, "checksums.json")
    return step


def planted_export(trained: Path, tmp_path: Path, marker: Path) -> Path:
    export = copy_export(trained, tmp_path)
    plant_model_code(export, marker)
    reseal(export, "gptpipe_checksums.json")
    return export


def planted_tokenizer(trained: Path, tmp_path: Path, marker: Path) -> Path:
    export = copy_export(trained, tmp_path)
    plant_tokenizer_code(export, marker)
    reseal(export, "gptpipe_checksums.json")
    return export


PLANTS = {
    # where the code is named: (plant it, what the message says)
    "a step folder's config.json": (planted_step, r"ships its own modelling code \(an auto_map in its config.json\).* none of it ran"),
    "an export's config.json": (planted_export, r"ships its own modelling code \(an auto_map in its config.json\).* none of it ran"),
    "an export's tokenizer_config.json": (planted_tokenizer, r"could not load tokenizer .*contains custom code"),
}  # fmt: skip


@pytest.mark.parametrize("where", list(PLANTS))
def test_planted_model_code_never_runs_even_when_answered_yes(trained, tmp_path, where):
    """`echo y | gptpipe sample --model <folder>`: transformers' "run the custom code? [y/N]" is never asked."""
    plant, message = PLANTS[where]
    marker = tmp_path / "PWNED"
    folder = plant(trained, tmp_path, marker)
    env = {**clean_env(), "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": str(ROOT)}  # this tree's gptpipe
    out = subprocess.run([sys.executable, "-m", "pipeline", "sample", "--model", str(folder), "--prompt", "hi"], input="y\n",
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert not marker.exists(), out.stdout + out.stderr
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    (line,) = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert __import__("re").search(message, line), line


@pytest.mark.parametrize("reader", READERS)
def test_planted_code_in_a_step_folder_is_one_message_in_every_reader(trained, tokens_dir, tmp_path, reader):
    """Nothing on standard input (pytest's): before, a ValueError traceback in train, evaluate and sample."""
    marker = tmp_path / "PWNED"
    step = planted_step(trained, tmp_path, marker)
    with pytest.raises(UserError, match=r"ships its own modelling code .*none of it ran. Set that if you trust the code"):
        read_model(reader, step, tokens_dir, tmp_path)
    assert not marker.exists()


def test_every_from_pretrained_says_whether_to_trust_remote_code():
    """Every load of a config, model or tokenizer in pipeline/ passes trust_remote_code, so transformers never asks."""
    missing = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            receiver = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            # PeftModel.from_pretrained reads an adapter's JSON config and safetensors onto a base model gptpipe has
            # already loaded (with the flag): it runs no code, and takes no such argument.
            loads = (node.func.attr == "from_pretrained" and receiver != "PeftModel") or (node.func.attr == "from_config" and receiver.startswith("Auto"))
            if loads and not any(k.arg == "trust_remote_code" for k in node.keywords):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not missing, missing


# ------------------------------------------------------------------- 9: damaged weights in an unsealed folder


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[10:20] = b"\xff" * 10
    path.write_bytes(bytes(data))


WEIGHTS_DAMAGE = {"cut in half": truncate, "zero bytes": lambda p: p.write_bytes(b""), "header garbled": garble_header}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("damage", list(WEIGHTS_DAMAGE))
def test_damaged_safetensors_in_an_unsealed_folder_is_one_message(trained, tokens_dir, tmp_path, damage, reader):
    export = copy_export(trained, tmp_path)
    (export / "gptpipe_checksums.json").unlink(missing_ok=True)  # as a Hugging Face download: no checksum catches the damage
    WEIGHTS_DAMAGE[damage](export / "model.safetensors")
    with pytest.raises(UserError, match=r"model.safetensors is damaged or cut short \(.*\): copy or download the model again"):
        read_model(reader, export, tokens_dir, tmp_path)


# ------------------------------------------------------------- 11: resume: never does not move model.init away


@pytest.mark.parametrize("init", ["the run folder", "a step in it"])
def test_resume_never_refuses_to_move_the_model_it_starts_from(trained, tokens_dir, tmp_path, init):
    mine = Path(shutil.copytree(run_of(trained), tmp_path / "checkpoints" / "mine"))
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if not p.name.startswith("."))  # the lock aside
    path = mine if init == "the run folder" else mine / "step-000008"
    raw = model_params(tokens_dir, tmp_path, str(path), run_name="mine", resume="never")
    with pytest.raises(UserError, match=r"train.resume=never would move .*mine aside to start over, but model.init=.* is"
                                        r" (that folder|inside it).* Nothing was moved"):
        run_training(raw)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if not p.name.startswith(".")) == before


# ---------------------------------------------------------------------------- 13: messages that say what is so


@pytest.mark.parametrize("init, kind, message", [
    ("/nowhere/models/final", "char", r"model.init: '/nowhere/models/final' not found \(no such folder; a hub id has the form"),
    ("models/fnal", "char", r"model.init='models/fnal' is no folder here, so it names a model on the Hugging Face hub"),
    ("./models/fnal", "hf", r"model.init='./models/fnal': not found \(no such folder; a hub id has the form name or owner/name\)"),
    ("models/fnal", "hf", r"model.init='models/fnal': no folder of this name here, and as a hub id it cannot be loaded .*"
                          r"HF_HUB_OFFLINE is set, so only the cache is read"),
])  # fmt: skip
def test_a_model_init_that_does_not_exist_is_called_missing(trained, tokens_dir, tmp_path, init, kind, message):
    raw = model_params(tokens_dir, tmp_path, init)
    if kind == "hf":  # a hub model's own tokenizer: any Hugging Face tokenizer folder will do to get to the model
        hf_tokenizer(tmp_path / "hf_tokenizer")
        raw["tokenize"] = {"kind": "hf", "pretrained": str(tmp_path / "hf_tokenizer"), "out_dir": str(tokens_dir)}
    with pytest.raises((UserError, SystemExit), match=message):
        run_training(raw)
    assert not list(tmp_path.glob("checkpoints/run-*"))


def test_a_run_folder_pruned_while_read_is_not_called_damaged(trained, tmp_path, monkeypatch):
    """Its step folders removed while they are hashed (as the run that writes the folder prunes them): said so."""
    run = Path(shutil.copytree(run_of(trained), tmp_path / "run"))
    real_sha256 = pipeline_files.sha256

    def pruned_meanwhile(path):
        for step in run.glob("step-*"):
            shutil.rmtree(step)
        return real_sha256(path)

    monkeypatch.setattr(pipeline_files, "sha256", pruned_meanwhile)
    with pytest.raises(UserError, match=r"--model: the checkpoints step-000004, step-000008 of .*run were removed while they"
                                        r" were being read"):
        load_for_inference(run, key="--model")


def test_a_step_folder_pruned_while_read_is_not_called_damaged(trained, tmp_path, monkeypatch):
    step = copy_step(trained, tmp_path)
    real_sha256 = pipeline_files.sha256

    def pruned_meanwhile(path):
        shutil.rmtree(step, ignore_errors=True)
        return real_sha256(path)

    monkeypatch.setattr(pipeline_files, "sha256", pruned_meanwhile)
    with pytest.raises(UserError, match=r"--model: checkpoint .*step-000008 was removed while it was being read"):
        load_for_inference(step, key="--model")


def fifo_config(folder: Path) -> None:
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")


@pytest.mark.parametrize("where", ["a Hugging Face folder", "an export", "a step folder"])
def test_a_fifo_as_config_json_is_named_as_one(trained, tmp_path, monkeypatch, where):
    if where == "a step folder":
        folder = copy_step(trained, tmp_path)
    else:
        folder = copy_export(trained, tmp_path)
        if where == "a Hugging Face folder":
            (folder / "gptpipe_checksums.json").unlink(missing_ok=True)
    fifo_config(folder)
    one_message(gptpipe("sample", "--model", str(folder), "--prompt", "hi", cwd=tmp_path, monkeypatch=monkeypatch),
                r"config.json is not a regular file \(a FIFO, socket or device\)")
