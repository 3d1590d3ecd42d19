"""The generated DeepSpeed config, a user JSON on top of it, and the batch arithmetic."""

import json

import pytest

from pipeline import config, params
from pipeline.errors import UserError
from pipeline.infra.deepspeed import deepspeed_config, merge_user_config
from pipeline.infra.launcher import launcher_command


def ds_config(world_size=1, block_size=128, **train):
    t = config.TrainConfig(**train)
    return deepspeed_config(t, t.batch(world_size, block_size))


def test_every_key_comes_from_train_params():
    cfg = ds_config(world_size=4, micro_batch_size=8, grad_accum=2, grad_clip=0.5, zero_stage=2, precision="bf16", lr=3e-4, beta2=0.99)
    assert cfg["train_batch_size"] == 8 * 2 * 4
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["optimizer"]["params"]["lr"] == 3e-4 and cfg["optimizer"]["params"]["betas"] == [0.9, 0.99]


def test_offload_and_zero3_keys():
    cfg = ds_config(zero_stage=3, offload_optimizer=True, offload_params=True)
    zero = cfg["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"]
    assert cfg["optimizer"]["params"]["torch_adam"] is False  # offload needs DeepSpeed's CPU Adam
    with pytest.raises(UserError, match="train.offload_params: needs train.zero_stage=3"):
        params.validate_params({"train": {"offload_params": True, "zero_stage": 2}})


def test_accumulation_from_global_batch_tokens():
    t = config.TrainConfig(micro_batch_size=4, global_batch_tokens=4 * 128 * 2 * 3)
    assert t.batch(world_size=2, block_size=128).grad_accum == 3
    assert t.batch(world_size=1, block_size=128).grad_accum == 6
    with pytest.raises(UserError, match=r"train.global_batch_tokens=3072 must equal train.micro_batch_size \(4\) x train.grad_accum"):
        t.batch(world_size=4, block_size=128)
    both = config.TrainConfig(micro_batch_size=4, global_batch_tokens=1024, grad_accum=3)
    with pytest.raises(UserError, match="with grad_accum=3"):
        both.batch(world_size=1, block_size=128)


def test_user_json_is_merged_on_top_and_changes_are_reported(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 5e7}, "wall_clock_breakdown": True}))
    merged, changed = merge_user_config(ds_config(), str(user))
    assert merged["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 5e7}
    assert merged["wall_clock_breakdown"] is True and merged["optimizer"]["type"] == "AdamW"
    assert changed == ["zero_optimization.stage: 0 -> 1", "wall_clock_breakdown: False -> True"]


def test_user_json_may_not_change_the_batch_and_bad_files_are_named(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 64}))
    with pytest.raises(UserError, match="sets train_micro_batch_size_per_gpu, which gptpipe derives"):
        merge_user_config(ds_config(), str(user))
    user.write_text('{"zero_optimization": {"stage": 1,}}')
    with pytest.raises(UserError, match=r"ds.json:1: invalid JSON"):
        merge_user_config(ds_config(), str(user))
    with pytest.raises(UserError, match="not found"):
        merge_user_config(ds_config(), str(tmp_path / "missing.json"))


def test_launcher_command_from_params(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-1 slots=8\n")
    t = config.TrainConfig(launcher="deepspeed", hostfile=str(hostfile), num_gpus=8, num_nodes=1, master_port=29600, launcher_args=["--no_ssh_check"])
    cmd = launcher_command(t, ["--params", "params.yaml"])
    assert cmd[0].endswith("deepspeed")
    assert cmd[1:] == [
        "--hostfile", str(hostfile), "--num_nodes", "1", "--num_gpus", "8", "--master_port", "29600", "--no_ssh_check",
        "--no_local_rank", "--module", "pipeline.train", "--params", "params.yaml",
    ]  # fmt: skip
    with pytest.raises(UserError, match="train.hostfile: .* not found"):
        launcher_command(config.TrainConfig(hostfile=str(tmp_path / "nope")), [])


def test_include_and_exclude_reach_the_launcher_and_do_not_mix_with_counts(tmp_path):
    cmd = launcher_command(config.TrainConfig(include="localhost:2,3", master_port=29600), [])
    assert cmd[1:5] == ["--include", "localhost:2,3", "--master_port", "29600"]
    (tmp_path / "hostfile").write_text("worker-1 slots=2\nworker-2 slots=2\n")
    cmd = launcher_command(config.TrainConfig(exclude="worker-2:0", hostfile=str(tmp_path / "hostfile")), [])
    assert "--exclude" in cmd and "worker-2:0" in cmd
    with pytest.raises(UserError, match="train.include: cannot be combined with train.num_gpus"):
        params.validate_params({"train": {"include": "localhost:0", "num_gpus": 2}})


def test_the_gpu_peak_for_mfu_is_the_tf32_one_only_when_tf32_is_on():
    from pipeline.infra.hardware import gpu_peak_tflops

    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16", tf32=False) == 989.0
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == 156.0  # TF32 on tensor cores
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", tf32=False) == 19.5  # plain fp32
    assert gpu_peak_tflops("Tesla V100-SXM2-16GB", "fp32", tf32=True) == 15.7  # Volta has no TF32
    assert gpu_peak_tflops("NVIDIA H200", "fp16", tf32=True) == 989.0
    assert gpu_peak_tflops("Some Future GPU", "bf16", tf32=True) is None


def test_mfu_is_against_a_peak_measured_here_cached_and_never_over_100_percent(tokens_dir, tmp_path, monkeypatch, capfd):
    """No constant peak on a CPU: a matmul calibration, once per machine (cached), named in the summary; a cached
    peak below what training then reaches (measured on a busy machine) is raised, so MFU stays at or under 100%."""
    import json

    import torch
    from conftest import logged, run_training, tiny_params

    from pipeline.infra.hardware import machine_key, measured_peak

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = measured_peak("fp32", torch.device("cpu"))
    assert 0.001 < first.tflops < 1000 and "measured on this machine" in first.source
    cache = tmp_path / "cache" / "gptpipe" / "peaks.json"
    key = machine_key("fp32", torch.device("cpu"))
    assert json.loads(cache.read_text())[key]["tflops"] == first.tflops
    assert measured_peak("fp32", torch.device("cpu")) == first  # cached: not measured again

    cache.write_text(json.dumps({key: {"tflops": 1e-9, "when": "2026-01-01"}}))  # far below anything real
    summary = run_training(tiny_params(tokens_dir, tmp_path, max_steps=4, log_interval=1))
    out = capfd.readouterr().out
    assert "above the measured peak 1e-09" in out, out
    assert all(0 < m <= 1.0 for m in logged(tmp_path, "train/mfu")), logged(tmp_path, "train/mfu")
    assert summary["MFU against"].startswith(f"{summary['MFU against'].split()[0]} TFLOP/s per process: the rate this run reached")


def test_a_given_peak_is_used_as_it_is(tokens_dir, tmp_path):
    from conftest import run_training, tiny_params

    summary = run_training(tiny_params(tokens_dir, tmp_path, max_steps=2, peak_tflops=123.0))
    assert summary["MFU against"] == "123 TFLOP/s per process: train.peak_tflops"
