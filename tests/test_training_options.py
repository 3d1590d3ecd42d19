"""What users of run_clm.py, the HF Trainer, nanoGPT and build-nanogpt rely on while training, on tiny models:
best-model export, epochs, early stopping, evaluation and samples along the way, runs a user names and resumes,
fine-tuning a pretrained checkpoint, the loggers they watch, and the log lines they compare."""

import importlib.util
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import exported_weights, finish, launch, logged, run_training, tiny_params
from safetensors.torch import load_file

from pipeline import params
from pipeline.checkpoints.folder import checkpoint_weights
from pipeline.config.model import ModelConfig
from pipeline.config.prepare import PrepareConfig
from pipeline.config.tokenize import TokenizeConfig
from pipeline.errors import UserError
from pipeline.layout import RunDir
from pipeline.prepare.stage import prepare_corpus
from pipeline.report.stage import build_report
from pipeline.tokenize.stage import tokenize_corpus
from pipeline.tokens import open_tokens


@pytest.fixture(scope="module")
def small_train(tmp_path_factory, shared_data) -> Path:
    """3 KB of text to train on and 20 KB to validate on: a model overfits it within 150 steps."""
    root = tmp_path_factory.mktemp("small")
    text = (shared_data / "tinyshakespeare.txt").read_text()
    (root / "train.txt").write_text(text[:3000])
    (root / "val.txt").write_text(text[100_000:120_000])
    prepared = PrepareConfig.model_validate({"source": {"kind": "files", "path": str(root / "train.txt")},
                                            "val_source": {"kind": "files", "path": str(root / "val.txt")},
                                            "out_dir": str(root / "prepared")})
    prepare_corpus(prepared)
    tokenize_corpus(TokenizeConfig(kind="char", out_dir=str(root / "tokens"), unknown_chars="unk"), root / "prepared")
    return root / "tokens"


def run_of(root: Path) -> RunDir:
    (run,) = (root / "checkpoints").glob("run-*")
    return RunDir(run)


OVERFIT = dict(model={"n_layer": 2, "n_head": 2, "n_embd": 64}, max_steps=150, micro_batch_size=8, warmup_steps=5,
               lr=3e-3, eval_interval=10, save_interval=1000, log_interval=50, eval_batches=4)  # fmt: skip


def test_export_best_writes_the_weights_with_the_lowest_val_loss(small_train, tmp_path):
    summary = run_training(tiny_params(small_train, tmp_path, **OVERFIT))
    val = logged(tmp_path, "val/loss")
    best_step = 10 * (1 + min(range(len(val)), key=val.__getitem__))
    assert val[-1] > min(val) and best_step < 150  # it overfits: the last evaluation is not the best
    assert summary["exported"].startswith(f"best (step-{best_step:06d}")
    run = run_of(tmp_path)
    best = checkpoint_weights(run.step(f"step-{best_step:06d}"))
    last = checkpoint_weights(run.step("step-000150"))
    exported = exported_weights(tmp_path)
    for name, tensor in exported.items():
        assert torch.equal(tensor, best[name]), name
    assert any(not torch.equal(exported[n], last[n]) for n in exported)
    info = json.loads((tmp_path / "final" / "gptpipe.json").read_text())
    assert info["exported"] == "best" and info["step"] == best_step and info["val_loss"] == pytest.approx(min(val))

    run_training(tiny_params(small_train, tmp_path / "last", **OVERFIT, export="last"))
    assert json.loads((tmp_path / "last" / "final" / "gptpipe.json").read_text())["step"] == 150


def test_early_stopping_stops_at_the_predicted_evaluation_and_stays_stopped(small_train, tmp_path):
    # No evaluation can improve by 10 nats: the first sets the best, the next two do not improve, patience 2 stops.
    raw = tiny_params(small_train, tmp_path, max_steps=100, eval_interval=5, save_interval=1000,
                      early_stopping_patience=2, early_stopping_min_delta=10.0)
    summary = run_training(raw)
    assert summary["steps"] == 15 and summary["stopped"].startswith("stopped early at step 15")
    run = run_of(tmp_path)
    assert run.latest.read_text() == "step-000015"
    assert json.loads((tmp_path / "metrics" / "metrics.json").read_text())["stopped"].startswith("stopped early")
    again = run_training(raw)  # what `dvc exp run` does once more: a stopped run is complete
    assert again["steps"] == 15 and again["stopped"].startswith("stopped early")


def test_hellaswag_and_samples_during_training_reach_the_metrics_and_the_report(tokens_dir, tmp_path, shared_data):
    raw = tiny_params(tokens_dir, tmp_path, max_steps=8, hellaswag_interval=4, hellaswag_limit=6, sample_interval=4,
                      sample_prompts=["ROMEO:"], sample_max_new_tokens=12, eval_at_start=True)
    raw["evaluate"] = {"hellaswag": str(shared_data / "hellaswag_val_sample.jsonl"), "metrics_file": str(tmp_path / "m.json")}
    raw["sample"] = {"out_dir": str(tmp_path / "reports")}
    raw["report"] = {"out_dir": str(tmp_path / "reports")}
    run_training(raw)
    acc = logged(tmp_path, "hellaswag/acc_norm")
    assert len(acc) == 2 and all(0 <= a <= 1 for a in acc)
    assert len(logged(tmp_path, "val/loss")) == 2  # step 0 (eval_at_start), then step 8
    samples = [json.loads(line) for line in (tmp_path / "metrics" / "samples" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [4, 8] and all(s["prompt"] == "ROMEO:" and s["text"] for s in samples)
    build_report(params.validate_params(raw))
    md = (tmp_path / "reports" / "report.md").read_text()
    assert "## Samples during training" in md and "**step 4**" in md and "ROMEO:" + samples[0]["text"] in md
    assert (tmp_path / "reports" / "plots" / "hellaswag.png").stat().st_size > 5000


def test_resume_never_starts_over_and_a_checkpoint_folder_resumes_that_step(tokens_dir, tmp_path, capfd):
    run_training(tiny_params(tokens_dir, tmp_path, max_steps=12, save_interval=4))
    run = run_of(tmp_path)
    capfd.readouterr()
    run_training(tiny_params(tokens_dir, tmp_path, max_steps=12, save_interval=4, resume=str(run.root / "step-000004")))
    out = capfd.readouterr().out
    assert f"resuming {run.root}/step-000004" in out and "step-000008, step-000012 moved to" in out
    assert (run.root / "abandoned-after-step-000004" / "step-000012").is_dir()
    reference = exported_weights(tmp_path)
    # Left in params, the same resume branches off step 4 again: the newer branch goes aside too, nothing is lost.
    run_training(tiny_params(tokens_dir, tmp_path, max_steps=12, save_interval=4, resume=str(run.root / "step-000004")))
    assert "Set train.resume back to auto" in capfd.readouterr().out
    assert (run.root / "abandoned-after-step-000004" / "step-000012").is_dir()
    assert (run.root / "abandoned-after-step-000004.2" / "step-000012").is_dir()
    run_training(tiny_params(tokens_dir, tmp_path, max_steps=12, save_interval=4, resume="never"))
    out = capfd.readouterr().out
    assert "starting over" in out and "starting fresh" in out
    assert (run.root.parent / f"{run.root.name}.previous" / "step-000012").is_dir()
    for name, tensor in exported_weights(tmp_path).items():  # a resumed run and a fresh one end the same
        assert torch.equal(tensor, reference[name]), name


def test_fresh_is_a_shortcut_for_resume_never(tokens_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(tokens_dir, tmp_path, max_steps=4)))
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(app, ["train"]).exit_code == 0
    result = CliRunner().invoke(app, ["train", "--fresh"])
    assert result.exit_code == 0 and "starting over" in result.output


def test_a_run_name_names_the_folder_and_refuses_other_settings(tokens_dir, tmp_path):
    run_training(tiny_params(tokens_dir, tmp_path, max_steps=4, run_name="baseline"))
    run = RunDir(tmp_path / "checkpoints" / "baseline")
    assert run.latest.read_text() == "step-000004" and "train.tokens_per_step" in json.loads(run.identity.read_text())
    with pytest.raises(UserError, match=r"train.run_name=baseline: .* holds a run with other settings \(train.lr 0.003 -> 0.001\)"):
        run_training(tiny_params(tokens_dir, tmp_path, max_steps=4, run_name="baseline", lr=1e-3))
    with pytest.raises(UserError, match=r"train.run_name: '\.\./x': letters, digits"):
        params.validate_params({"train": {"run_name": "../x"}})


def test_epochs_become_steps_from_the_token_count(tokens_dir, tmp_path):
    raw = tiny_params(tokens_dir, tmp_path, max_steps=None, epochs=0.05, save_interval=1000, eval_interval=1000)
    windows = (len(open_tokens(tokens_dir / "train-00000.bin")) - 1) // 32
    summary = run_training(raw)
    assert summary["steps"] == math.ceil(0.05 * windows / 4)
    with pytest.raises(UserError, match="exactly one must be set"):
        params.validate_params({"train": {"epochs": 2}})


@pytest.mark.slow
def test_epochs_give_the_same_steps_on_two_processes_under_zero3_with_evals_and_samples(tokens_dir, tmp_path, shared_data):
    """One launcher run: epochs with a global batch in tokens give the same step count on 2 processes; HellaSwag and
    samples along the way under ZeRO-3 (every rank in every forward pass) do not hang."""
    windows = (len(open_tokens(tokens_dir / "train-00000.bin")) - 1) // 32
    raw = tiny_params(tokens_dir, tmp_path, max_steps=None, epochs=0.02, global_batch_tokens=4 * 32 * 2, micro_batch_size=4,
                      zero_stage=3, hellaswag_interval=3, hellaswag_limit=5, sample_interval=3, save_interval=1000, eval_interval=3)
    raw["evaluate"] = {"hellaswag": str(shared_data / "hellaswag_val_sample.jsonl")}
    finish(launch(["--num_gpus", "2", "--master_port", "29691"], raw, tmp_path))
    expected = math.ceil(0.02 * windows / 8)  # the global batch is 8 sequences whatever the world size
    assert json.loads((tmp_path / "final" / "gptpipe.json").read_text())["tokens_seen"] == expected * 8 * 32
    assert len(logged(tmp_path, "hellaswag/acc_norm")) == len([s for s in range(1, expected + 1) if s % 3 == 0 or s == expected])


# ----------------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory) -> Path:
    """A tiny GPT-2-shaped pretrained checkpoint with GPT-2's vocabulary (so tiktoken's gpt2 ids fit), in bf16."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=50256, eos_token_id=50256)
    GPT2LMHeadModel(cfg).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_tokens(tmp_path_factory, shared_data) -> Path:
    root = tmp_path_factory.mktemp("gpt2tok")
    (root / "corpus.txt").write_text((shared_data / "tinyshakespeare.txt").read_text()[:40_000])
    prepared = PrepareConfig.model_validate({"source": {"kind": "files", "path": str(root / "corpus.txt"), "separator": "\n\n"},
                                            "out_dir": str(root / "prepared")})
    prepare_corpus(prepared)
    tokenize_corpus(TokenizeConfig(kind="tiktoken", out_dir=str(root / "tokens")), root / "prepared")
    return root / "tokens"


def test_a_gpt2_checkpoint_fine_tunes_on_tiktoken_ids_with_the_dropout_asked(gpt2_checkpoint, gpt2_tokens, tmp_path):
    raw = tiny_params(gpt2_tokens, tmp_path, model={"init": str(gpt2_checkpoint), "block_size": 32, "dropout": 0.2},
                      tokenize={"kind": "tiktoken", "encoding": "gpt2", "out_dir": str(gpt2_tokens)}, max_steps=4, eval_at_start=True)
    del raw["model"]["n_layer"], raw["model"]["n_head"], raw["model"]["n_embd"]
    run_training(raw)
    exported = json.loads((tmp_path / "final" / "config.json").read_text())
    assert exported["resid_pdrop"] == exported["embd_pdrop"] == exported["attn_pdrop"] == 0.2
    # export_dtype auto: the checkpoint's own bf16, the fp32 master weights rounded once
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "final" / "model.safetensors").values())
    assert len(logged(tmp_path, "val/loss")) >= 2  # step 0 first: the pretrained model's val loss before fine-tuning


def test_a_checkpoint_with_other_ids_is_refused_for_tiktoken(gpt2_tokens, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 eos_token_id=2)).save_pretrained(tmp_path / "llama")
    raw = tiny_params(gpt2_tokens, tmp_path, model={"init": str(tmp_path / "llama"), "block_size": 32},
                      tokenize={"kind": "tiktoken", "out_dir": str(gpt2_tokens)}, max_steps=2)
    del raw["model"]["n_layer"], raw["model"]["n_head"], raw["model"]["n_embd"]
    with pytest.raises(UserError, match=r"does not use the ids of tokenize.kind=tiktoken .*use tokenize.kind=hf"):
        run_training(raw)


def test_bf16_training_exports_fp32_master_weights_or_bf16_when_asked(tokens_dir, tmp_path):
    run_training(tiny_params(tokens_dir, tmp_path / "auto", max_steps=4, precision="bf16", zero_stage=1))
    weights = exported_weights(tmp_path / "auto")
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert any(not torch.equal(t, t.bfloat16().float()) for t in weights.values())  # not bf16 values widened
    run_training(tiny_params(tokens_dir, tmp_path / "bf16", max_steps=4, precision="bf16", export_dtype="bf16"))
    assert all(t.dtype == torch.bfloat16 for t in exported_weights(tmp_path / "bf16").values())


# ------------------------------------------------------------------------------------------ logging


def test_tensorboard_and_offline_wandb_hold_the_loss(tokens_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_training(tiny_params(tokens_dir, tmp_path, max_steps=8, loggers=["dvclive", "tensorboard", "wandb"], run_name="logged"))
    losses = logged(tmp_path, "train/loss")
    events = EventAccumulator(str(tmp_path / "metrics" / "tensorboard" / "logged"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses)
    (record,) = (tmp_path / "metrics" / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 30  # W&B's service process may still be writing the file when finish() returns
    while b"train/loss" not in record.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    data = record.read_bytes()
    assert b"train/loss" in data and json.dumps(losses[-1]).encode() in data


def test_a_resumed_run_continues_its_wandb_run_and_logs_each_tensorboard_step_once(tokens_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    raw = tiny_params(tokens_dir, tmp_path, max_steps=8, save_interval=4, log_interval=1, loggers=["tensorboard", "wandb"], run_name="r")
    run_training(raw)
    # A crash after step 8 was logged but before its checkpoint: the resume logs steps 5-8 again.
    run = tmp_path / "checkpoints" / "r"
    shutil.rmtree(run / "step-000008")
    (run / "latest").write_text("step-000004")
    run_training(raw)
    events = EventAccumulator(str(tmp_path / "metrics" / "tensorboard" / "r"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    records = list((tmp_path / "metrics" / "wandb").glob("offline-run-*/run-*.wandb"))  # run-<id>.wandb, one per process
    assert len(records) == 2 and len({r.stem for r in records}) == 1, records


def test_a_logger_that_is_not_installed_is_one_message(tokens_dir, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(UserError, match=r"train.loggers names wandb, which is not installed: pip install 'gptpipe\[wandb\]'"):
        run_training(tiny_params(tokens_dir, tmp_path, max_steps=2, loggers=["wandb"]))


def test_the_log_has_ms_per_step_wall_times_and_the_resolved_configuration(tokens_dir, tmp_path, capfd):
    summary = run_training(tiny_params(tokens_dir, tmp_path, max_steps=8))
    out = capfd.readouterr().out
    assert "train: batch     4 x 1 accumulation x 1 processes = 4 sequences = 128 tokens per step" in out
    assert "train: length    8 steps, 1,024 tokens" in out and "train: optimizer AdamW lr 3.00e-03, weight decay 0.1, warmup 2, cosine to 3.00e-04, clip 1.0" in out
    assert " ms | " in out and len(logged(tmp_path, "train/ms_per_step")) == 2
    times = json.loads((tmp_path / "metrics" / "metrics.json").read_text())["time"]
    assert {"setup", "train", "eval", "save", "export", "total"} <= set(times)
    assert times["total"] >= times["train"] > 0 and summary["seconds total"] > 0
    metrics = json.loads((tmp_path / "metrics" / "metrics.json").read_text())
    assert 100e6 < metrics["peak_memory_bytes"] < 20e9 and summary["peak memory"].endswith("GB resident")  # the process at its largest


# ------------------------------------------------------------------------------------------ time to a target loss


def test_the_first_evaluation_at_the_target_is_recorded_and_kept_across_a_resume(tokens_dir, tmp_path):
    """train.target_loss: steps, tokens, model FLOPs and seconds at the first evaluation at or below it, into
    metrics.json (dvc exp show) and the summary; a resumed run keeps that record; val curves carry time and FLOPs."""
    raw = tiny_params(tokens_dir, tmp_path, max_steps=8, eval_interval=4, save_interval=4, target_loss=10.0)
    summary = run_training(raw)
    metrics = json.loads((tmp_path / "metrics" / "metrics.json").read_text())
    target = metrics["target"]
    assert target["reached"] is True and target["loss"] == 10.0 and target["step"] == 4 and target["tokens"] == 4 * 128
    assert target["flops"] > 0 and 0 < target["train_seconds"] < target["stage_seconds"] and target["val_loss"] <= 10.0
    assert summary["target"].startswith("val loss 10.0 reached at step 4:"), summary["target"]
    assert logged(tmp_path, "val/train_seconds")[0] == pytest.approx(target["train_seconds"], abs=1e-3)
    assert len(logged(tmp_path, "val/flops")) == len(logged(tmp_path, "val/loss")) == 2

    run_training({**raw, "train": {**raw["train"], "max_steps": 12}})  # resumed from step 8
    again = json.loads((tmp_path / "metrics" / "metrics.json").read_text())["target"]
    assert again == target  # the first time it was reached, not a later one
    assert logged(tmp_path, "val/train_seconds") == sorted(logged(tmp_path, "val/train_seconds"))  # over every resume


def test_a_target_never_reached_says_so_with_no_figure(tokens_dir, tmp_path):
    summary = run_training(tiny_params(tokens_dir, tmp_path, max_steps=4, eval_interval=4, save_interval=4, target_loss=0.001))
    assert json.loads((tmp_path / "metrics" / "metrics.json").read_text())["target"] == {"loss": 0.001, "reached": False}
    assert summary["target"].startswith("val loss 0.001 not reached (best ")


def test_stop_at_target_ends_the_run_there_and_exports(tokens_dir, tmp_path):
    summary = run_training(tiny_params(tokens_dir, tmp_path, max_steps=16, eval_interval=4, save_interval=8, target_loss=10.0,
                                       stop_at_target=True))
    assert summary["steps"] == 4 and "reached train.target_loss=10.0" in summary["stopped"]
    assert (tmp_path / "final" / "model.safetensors").is_file()
    with pytest.raises(UserError, match=r"train.stop_at_target: needs train.target_loss"):
        run_training(tiny_params(tokens_dir, tmp_path, stop_at_target=True))


def test_a_key_that_does_nothing_here_is_one_message(tokens_dir, tmp_path):
    """Issue 21: llama's keys with arch gpt2 (and shape keys with a pretrained init) changed nothing but the run's
    identity, so the no-op edit started a new run in silence. Now each is an error naming the key and why; at its
    default it is harmless (the shipped params.yaml lists the shape keys)."""
    with pytest.raises(UserError) as e:
        params.validate_params({"model": {"n_kv_head": 1, "rope_theta": 5e5}})
    assert "model.n_kv_head: 1 does nothing with model.arch=gpt2 (it shapes llama models only): remove it" in str(e.value)
    assert "model.rope_theta: 500000.0 does nothing" in str(e.value)
    with pytest.raises(UserError, match=r"model.n_layer: 6 does nothing with model.init='gpt2' \(a pretrained model keeps its own shape\)"):
        params.validate_params({"model": {"init": "gpt2", "n_layer": 6}})
    ModelConfig(init="gpt2", n_layer=4, n_embd=128, block_size=64, dropout=0.1)  # defaults, and keys that apply
    ModelConfig(arch="llama", n_kv_head=2, rope_theta=5e5)
    # GPT-2's MLP width is wired to its config's n_inner (HipGPT's --ff): a different model, a different run.
    from pipeline.model.build import scratch_config

    assert scratch_config(ModelConfig(intermediate_size=320), 300, 0).n_inner == 320
    assert scratch_config(ModelConfig(), 300, 0).n_inner is None  # GPT-2's own 4 * n_embd
    summary = run_training(tiny_params(tokens_dir, tmp_path, max_steps=2, model={"intermediate_size": 96}))
    assert summary["steps"] == 2
    mlp = json.loads((tmp_path / "final" / "config.json").read_text())
    assert mlp["n_inner"] == 96


def test_save_interval_0_keeps_only_the_end_and_the_improvements(tokens_dir, tmp_path):
    """Issue 21: HipGPT's "no periodic checkpoints". With export: last only the last step is saved; with best, also
    each evaluation that improved (the best weights must be on disk to be exported)."""
    run_training(tiny_params(tokens_dir, tmp_path, max_steps=12, eval_interval=4, save_interval=0, export="last"))
    (run,) = (tmp_path / "checkpoints").glob("run-*")
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000012"]
    best = tmp_path / "best"
    run_training(tiny_params(tokens_dir, best, max_steps=12, eval_interval=4, save_interval=0))
    (run,) = (best / "checkpoints").glob("run-*")
    assert "step-000012" in {p.name for p in run.glob("step-*")} and (best / "final" / "model.safetensors").is_file()


def test_train_log_has_perplexity_and_token_accuracy_and_eval_batch_size_changes_only_speed(tokens_dir, tmp_path, capfd):
    """Issue 21: HipGPT prints perplexity and token accuracy with each train line; --per_device_eval_batch_size sets the
    evaluation batch apart from the training micro batch."""
    run_training(tiny_params(tokens_dir, tmp_path / "a", max_steps=4, log_interval=2, eval_interval=4))
    out = capfd.readouterr().out
    losses, perplexities = logged(tmp_path / "a", "train/loss"), logged(tmp_path / "a", "train/perplexity")
    accuracies = logged(tmp_path / "a", "train/token_accuracy")
    assert len(losses) == len(perplexities) == len(accuracies) == 2
    assert perplexities == pytest.approx([math.exp(x) for x in losses], rel=1e-6)
    assert all(0 < a < 1 for a in accuracies)  # a char model a few steps in gets some characters right (spaces, e)
    assert f"| ppl {perplexities[-1]:,.2f} | acc {100 * accuracies[-1]:.1f}% |" in out, out
    run_training(tiny_params(tokens_dir, tmp_path / "b", max_steps=4, log_interval=2, eval_interval=4, eval_batch_size=1))
    assert logged(tmp_path / "b", "val/loss") == pytest.approx(logged(tmp_path / "a", "val/loss"), abs=1e-5)


def test_document_mask_keeps_attention_and_positions_inside_each_document(tokens_dir, tmp_path):
    """Issue 21: train.document_mask. A packed window scores each document exactly as the document alone would
    (GPT-2's learned positions and Llama's RoPE restart, the mask is block-diagonal); training and evaluation use it."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from pipeline.eval.lm import document_positions, lm_forward, window_sums

    eot = 9
    x = torch.tensor([[1, 2, 3, eot, 4, 5, eot, 6], [eot, 1, 2, 3, 4, 5, 6, 7]])
    assert document_positions(x, eot).tolist() == [[0, 1, 2, 3, 0, 1, 2, 0], [0, 0, 1, 2, 3, 4, 5, 6]]
    torch.manual_seed(0)
    models = [GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=16)),
              LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=32,
                                           intermediate_size=64, vocab_size=16, max_position_embeddings=16))]
    for model in models:
        model.eval()
        with torch.no_grad():
            packed = lm_forward(model, x[:1], eot).logits[0]
            alone = [model(input_ids=torch.tensor([doc])).logits[0] for doc in ([1, 2, 3, eot], [4, 5, eot], [6])]
            plain = lm_forward(model, x[:1]).logits[0]
        assert torch.allclose(packed, torch.cat(alone), atol=1e-5), type(model).__name__
        assert not torch.allclose(plain[4:], torch.cat(alone[1:]), atol=1e-3)  # without it the second document sees the first
        tokens = x[0].numpy()
        masked = window_sums(model, tokens, np.array([0]), 7, 1, eot_id=eot)
        assert masked.loss != window_sums(model, tokens, np.array([0]), 7, 1).loss

    # Through the train stage: a new key that changes the run (a run without it keeps its identity), said in the log.
    plain_run = run_training(tiny_params(tokens_dir, tmp_path / "a", max_steps=4, eval_interval=4))
    masked_run = run_training(tiny_params(tokens_dir, tmp_path / "b", max_steps=4, eval_interval=4, document_mask=True))
    assert plain_run["steps"] == masked_run["steps"] == 4
    assert logged(tmp_path / "a", "val/loss") != logged(tmp_path / "b", "val/loss")
    # The evaluate stage scores each export as it was trained (its gptpipe.json says whether with the mask).
    from pipeline.eval.stage import evaluate_model

    for run, masked in (("a", False), ("b", True)):
        raw = tiny_params(tokens_dir, tmp_path / run)
        raw["evaluate"] = {"metrics_file": str(tmp_path / run / "eval.json"), "max_windows": 4}
        assert evaluate_model(params.validate_params(raw))["val"].get("document_mask", False) is masked
    p = params.validate_params(tiny_params(tokens_dir, tmp_path))
    from pipeline.checkpoints.run import run_identity

    assert "train.document_mask" not in run_identity(p, {}, p.train.batch(1, 32))
    p = params.validate_params(tiny_params(tokens_dir, tmp_path, document_mask=True))
    assert run_identity(p, {}, p.train.batch(1, 32))["train.document_mask"] is True


def test_document_mask_scores_the_same_through_every_attention_kernel(tokens_dir, tmp_path):
    """train.attention: SDPA and eager see the same block-diagonal mask, and the flash-attention layout (the batch as
    one row of B x T, each window's positions from 0) scores each window as the batch does; flash itself needs a
    GPU, so here it is chosen only on paper, and asked for on this machine it is one message before any folder."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from pipeline.eval.lm import attention_of, lm_forward
    from pipeline.model.build import attention_kernel

    eot = 9
    x = torch.tensor([[1, 2, 3, eot, 4, 5, eot, 6], [eot, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]])
    shapes = [GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=16),
              LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=32,
                          intermediate_size=64, vocab_size=16, max_position_embeddings=16)]
    for shape in shapes:
        logits = {}
        for kernel in ("sdpa", "eager"):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(shape, attn_implementation=kernel).eval()
            assert attention_of(model) == kernel
            with torch.no_grad():
                logits[kernel] = lm_forward(model, x, eot).logits
                flat = lm_forward(model, x, eot, flatten=True).logits
                alone = model(input_ids=x[2:]).logits  # a window without end-of-text is plain causal
            assert flat.shape == logits[kernel].shape == (3, 8, 16)
            assert torch.allclose(flat, logits[kernel], atol=1e-5), (type(model).__name__, kernel)
            assert torch.allclose(logits[kernel][2:], alone, atol=1e-5)
        assert torch.allclose(logits["sdpa"], logits["eager"], atol=1e-5), type(model).__name__

    # auto: SDPA here; flash-attention's variable-length kernel only for the mask, on CUDA, in half precision, installed.
    assert attention_kernel("auto", True, "bf16") == "sdpa" or torch.cuda.is_available()
    assert attention_kernel("auto", True, "bf16", cuda=True, flash_installed=True) == "flash_attention_2"
    for args in ((False, "bf16", True, True), (True, "fp32", True, True), (True, "bf16", False, True), (True, "bf16", True, False)):
        assert attention_kernel("auto", *args[:2], cuda=args[2], flash_installed=args[3]) == "sdpa", args
    assert attention_kernel("eager", True, "fp32") == "eager"
    with pytest.raises(UserError, match=r"train.attention=flash_attention_2 needs .*train.precision bf16 or fp16 \(it is fp32\)"):
        attention_kernel("flash_attention_2", True, "fp32", cuda=True, flash_installed=True)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="train.attention=flash_attention_2 needs a CUDA GPU"):
            run_training(tiny_params(tokens_dir, tmp_path / "flash", max_steps=2, document_mask=True, attention="flash_attention_2"))
        assert not (tmp_path / "flash" / "checkpoints").exists()
    # Through the train stage: the log names the kernel, and another kernel continues the same run.
    from pipeline.train.loop import train

    lines = []
    raw = tiny_params(tokens_dir, tmp_path / "e", max_steps=2, eval_interval=2, document_mask=True, attention="eager")
    train(params.validate_params(raw), echo=lines.append)
    assert any("attention eager" in line for line in lines)
    lines.clear()
    raw["train"].update(max_steps=4, attention="auto")
    assert train(params.validate_params(raw), echo=lines.append)["steps"] == 4
    assert any("resuming" in line for line in lines) and any("attention sdpa" in line for line in lines)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
                    reason="flash-attention's kernel needs a CUDA GPU and the flash_attn package (the GPU check runs it)")
def test_flash_attention_scores_packed_windows_as_sdpa_does_under_the_document_mask():
    """On a GPU: flash-attention's variable-length kernel, fed the batch as one row (lm_forward), gives the logits
    SDPA gives with the block-diagonal mask, for GPT-2 and Llama, within bf16's rounding."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from pipeline.eval.lm import attention_of, lm_forward

    eot = 9
    x = torch.tensor([[1, 2, 3, eot, 4, 5, eot, 6], [eot, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]], device="cuda")
    shapes = [GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=16, vocab_size=16),
              LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=64,
                          intermediate_size=128, vocab_size=16, max_position_embeddings=16)]
    for shape in shapes:
        torch.manual_seed(0)
        sdpa = AutoModelForCausalLM.from_config(shape, attn_implementation="sdpa", dtype=torch.bfloat16).cuda().eval()
        flash = AutoModelForCausalLM.from_config(shape, attn_implementation="flash_attention_2", dtype=torch.bfloat16).cuda().eval()
        flash.load_state_dict(sdpa.state_dict())
        assert attention_of(flash) == "flash_attention_2"
        with torch.no_grad():
            want = lm_forward(sdpa, x, eot).logits.float()
            got = lm_forward(flash, x, eot).logits.float()
            plain = flash(input_ids=x, use_cache=False).logits.float()  # no document mask: windows 0 and 1 change
        # bf16's rounding, well under what attending across the end-of-text changes (0.4-0.5 for these models on the CPU)
        err, leak = (got - want).abs().max().item(), (plain[:2] - want[:2]).abs().max().item()
        assert got.shape == want.shape == (3, 8, 16)
        assert err < 0.1 * leak, (type(sdpa).__name__, err, leak)
