"""A run continued on another number of processes (elastic resume) and ZeRO-3 models built under zero.Init.

Each case trains to step 4 on N processes, then resumes to step 8 on M: the curve and the final weights must
equal an uninterrupted one-process run's within fp32 reduction-order tolerance (the processes add gradients in
another order; everything else, the data of each step included, is the same).
"""

import json
import math
import shutil

import pytest
import torch
from conftest import exported_weights, finish, launch, logged, run_training, tiny_params

from pipeline.config.model import ModelConfig
from pipeline.config.train import TrainConfig
from pipeline.errors import UserError
from pipeline.infra.deepspeed import engine_config, model_init
from pipeline.infra.distributed import init_distributed
from pipeline.layout import RunDir

# The global batch is fixed in tokens, so the accumulation follows the number of processes: 2 x 1 or 1 x 2.
ELASTIC = dict(max_steps=8, decay_steps=8, global_batch_tokens=256, log_interval=1, eval_interval=4, save_interval=4, keep_last=5,
               model={"dropout": 0.0})
# Measured here (2 CPU processes, gloo): bit-identical curves and weights in all six cases. The bound leaves room
# for a reduction order that differs elsewhere; a real slip (e.g. one wrong Adam step) is 1e-3 by step 8.
RTOL, ATOL = 1e-5, 1e-7


def elastic_params(tokens_dir, root, zero_stage: int, **train) -> dict:
    return tiny_params(tokens_dir, root, zero_stage=zero_stage, **{**ELASTIC, **train})


@pytest.fixture(scope="module")
def uninterrupted(tokens_dir, tmp_path_factory) -> dict:
    """Per ZeRO stage: one process, straight to step 8."""
    out = {}
    for stage in (1, 2, 3):
        root = tmp_path_factory.mktemp(f"straight{stage}")
        run_training(elastic_params(tokens_dir, root, stage))
        out[stage] = root
    return out


def assert_same_run(root, reference) -> None:
    worst = {}
    for curve in ("train/loss", "val/loss"):
        ours, theirs = torch.tensor(logged(root, curve)), torch.tensor(logged(reference, curve))
        assert ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=RTOL, atol=ATOL), (curve, ours, theirs)
        worst[curve] = float(((ours - theirs).abs() / theirs.abs()).max())
    a, b = exported_weights(root), exported_weights(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=RTOL, atol=ATOL), (name, (a[name] - b[name]).abs().max())
    worst["weights"] = max(float((a[n] - b[n]).abs().max()) for n in a)
    print(f"largest differences from the uninterrupted run: {worst}")  # the figures docs/elastic.md quotes


def run_of(root) -> RunDir:
    (run,) = (root / "checkpoints").glob("run-*")
    return RunDir(run)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_processes_resumed_on_one_continue_the_same_run(tokens_dir, tmp_path, uninterrupted, capfd, stage):
    finish(launch(["--num_gpus", "2", "--master_port", str(29800 + stage)], elastic_params(tokens_dir, tmp_path, stage, max_steps=4), tmp_path))
    run = run_of(tmp_path)
    assert json.loads(run.step("step-000004").state.read_text())["world_size"] == 2
    capfd.readouterr()
    run_training(elastic_params(tokens_dir, tmp_path, stage))
    out = capfd.readouterr().out
    assert f"resuming {run.root}/step-000004" in out
    assert "step-000004 was saved by 2 processes, this run has 1: converted it to a universal checkpoint" in out
    assert_same_run(tmp_path, uninterrupted[stage])
    assert json.loads(run.step("step-000008").state.read_text())["world_size"] == 1

    # Once converted, always reused: resuming that step again finds the conversion.
    converted = run.universal("step-000004")
    before = {p: p.stat().st_mtime_ns for p in converted.rglob("*") if p.is_file()}
    run_training(elastic_params(tokens_dir, tmp_path, stage, resume=str(run.step("step-000004").root)))
    out = " ".join(capfd.readouterr().out.split())
    assert "loading its universal checkpoint" in out and "(converted before)" in out, out
    assert {p: p.stat().st_mtime_ns for p in converted.rglob("*") if p.is_file()} == before
    assert_same_run(tmp_path, uninterrupted[stage])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_one_process_resumed_on_two_continues_the_same_run(tokens_dir, tmp_path, uninterrupted, stage):
    run_training(elastic_params(tokens_dir, tmp_path, stage, max_steps=4))
    out = finish(launch(["--num_gpus", "2", "--master_port", str(29810 + stage)], elastic_params(tokens_dir, tmp_path, stage), tmp_path))
    assert "step-000004 was saved by 1 processes, this run has 2: converted it to a universal checkpoint" in out
    assert_same_run(tmp_path, uninterrupted[stage])
    assert json.loads(run_of(tmp_path).step("step-000008").state.read_text())["world_size"] == 2


def test_a_global_batch_the_processes_cannot_split_is_one_message_naming_the_keys():
    t = TrainConfig(micro_batch_size=4, global_batch_tokens=256)
    assert t.batch(2, 32).grad_accum == 1 and t.batch(1, 32).grad_accum == 2
    with pytest.raises(UserError, match=r"train.global_batch_tokens=256 .* train.micro_batch_size \(4\) .* 3 processes .* 1 or 2 processes"):
        t.batch(3, 32)


def test_another_global_batch_is_a_new_run_and_says_how_to_keep_the_old_one(tokens_dir, tmp_path, capfd):
    run_training(tiny_params(tokens_dir, tmp_path, max_steps=4, grad_accum=2))
    capfd.readouterr()
    run_training(tiny_params(tokens_dir, tmp_path, max_steps=4, grad_accum=1))
    out = " ".join(capfd.readouterr().out.split())
    assert "starting fresh" in out and "train.tokens_per_step 256 -> 128" in out
    assert "To continue that run on this number of processes, keep its global batch: train.global_batch_tokens=256" in out


# ------------------------------------------------------------------------------------------ zero.Init


def test_a_zero3_scratch_model_is_built_partitioned_with_the_same_initialisation(tokens_dir):
    """transformers' init must really run under zero.Init (a known trap leaves PyTorch's defaults: N(0, 1)
    embeddings instead of GPT-2's N(0, 0.02)): per-parameter std as without it."""
    import deepspeed

    from pipeline.model.build import build_model

    t = TrainConfig(zero_stage=3, micro_batch_size=4)
    model_cfg = ModelConfig(n_layer=2, n_head=4, n_embd=128, block_size=64)
    init_distributed()
    torch.manual_seed(0)
    plain = build_model(model_cfg, 1000, 0)
    torch.manual_seed(0)
    with model_init(engine_config(t, t.batch(1, 64)), t.collective_timeout):
        sharded = build_model(model_cfg, 1000, 0, shards=1)
    params = dict(sharded.named_parameters())
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params.values()), "not partitioned by zero.Init"
    for name, ref in plain.named_parameters():
        with deepspeed.zero.GatheredParameters([params[name]]):
            got = params[name].detach().clone()
        assert got.shape == ref.shape, name
        assert math.isclose(got.float().std().item(), ref.float().std().item(), rel_tol=0.1, abs_tol=1e-6), name


# ------------------------------------------------------------------------------------------ a conversion and its step


def plant_pickle(path) -> None:
    """A torch file whose unpickling would run code (it only would: gptpipe refuses it before loading)."""

    class Exploit:
        def __reduce__(self):
            return (exec, ("open('PWNED', 'w')",))

    torch.save({"weights": Exploit()}, path)


def relist(folder) -> None:
    """Rewrite a folder's checksums.json to match its files, as someone hiding an edit would."""
    from pipeline.checkpoints.folder import sha256

    listed = json.loads((folder / "checksums.json").read_text())
    listed = {name: sha256(folder / name) for name in listed if (folder / name).is_file()}
    (folder / "checksums.json").write_text(json.dumps(listed))


@pytest.mark.slow
def test_a_conversion_belongs_to_the_step_it_came_from(tokens_dir, tmp_path, capfd):
    """Issue 18 items 2, 7 and 13: a conversion is never loaded for a step saved again since, nor when a parameter
    file is gone (its listing edited to match), nor with a planted pickle in it; each case is named."""
    raw = lambda **train: elastic_params(tokens_dir, tmp_path, 1, save_interval=2, **train)  # noqa: E731
    finish(launch(["--num_gpus", "2", "--master_port", "29821"], raw(max_steps=4), tmp_path))
    run = run_of(tmp_path)
    run_training(raw(max_steps=6))  # on one process: converts step 4
    stale = tmp_path / "stale-conversion"
    shutil.copytree(run.universal("step-000004"), stale)

    # A branch from step 2 on two processes saves another step 4 (another decay, so other weights)...
    finish(launch(["--num_gpus", "2", "--master_port", "29822"], raw(max_steps=4, decay_steps=5, resume=str(run.step("step-000002").root)), tmp_path))
    assert not run.universal("step-000004").exists(), "the conversion of the earlier step 4 outlived it"
    # ...and a conversion of the earlier step 4 is back (restored by hand, or left by an older gptpipe).
    shutil.copytree(stale, run.universal("step-000004"))
    capfd.readouterr()
    run_training(raw(max_steps=5, decay_steps=5))
    out = " ".join(capfd.readouterr().out.split())
    assert "it was converted from an earlier step-000004, which has been saved again since): converting step-000004 again" in out, out
    fresh = json.loads((run.universal("step-000004") / "source.json").read_text())
    assert fresh["checksums_sha256"] != json.loads((stale / "source.json").read_text())["checksums_sha256"]
    loss = logged(tmp_path, "train/loss")[-1]

    # A planted pickle in the conversion: named, never loaded, converted again; the same step 5 follows.
    planted = run.universal("step-000004") / "zero" / "transformer.wpe.weight" / "fp32.pt"
    plant_pickle(planted)
    relist(run.universal("step-000004"))
    run_training(raw(max_steps=5, decay_steps=5, resume=str(run.step("step-000004").root)))
    out = " ".join(capfd.readouterr().out.split())
    assert "zero/transformer.wpe.weight/fp32.pt: it holds exec, which loading would run as code: refused" in out, out
    assert "converting step-000004 again" in out and not (tmp_path / "PWNED").exists()
    assert logged(tmp_path, "train/loss")[-1] == loss

    # A parameter's file deleted and the listing edited to match: every checksum holds, the model does not.
    gone = run.universal("step-000004") / "zero" / "transformer.h.0.attn.c_attn.weight" / "exp_avg.pt"
    gone.unlink()
    relist(run.universal("step-000004"))
    with pytest.raises(UserError, match=r"lacks what this model needs: zero/transformer.h.0.attn.c_attn.weight/exp_avg.pt is missing. Nothing was loaded; delete"):
        run_training(raw(max_steps=5, decay_steps=5, resume=str(run.step("step-000004").root)))
