"""The generated DeepSpeed config, a user JSON resolved into it, the batch arithmetic and the launcher command."""

import json

import pytest

from pipeline import params
from pipeline.config.train import TrainConfig
from pipeline.errors import UserError
from pipeline.infra.deepspeed import deepspeed_config, resolve_user_config
from pipeline.infra.launcher import launcher_command


def ds_config(world_size=1, block_size=128, **train):
    t = TrainConfig(**train)
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
    t = TrainConfig(micro_batch_size=4, global_batch_tokens=4 * 128 * 2 * 3)
    assert t.batch(world_size=2, block_size=128).grad_accum == 3
    assert t.batch(world_size=1, block_size=128).grad_accum == 6
    with pytest.raises(UserError, match=r"train.global_batch_tokens=3072 must equal train.micro_batch_size \(4\) x train.grad_accum"):
        t.batch(world_size=4, block_size=128)
    both = TrainConfig(micro_batch_size=4, global_batch_tokens=1024, grad_accum=3)
    with pytest.raises(UserError, match="with grad_accum=3"):
        both.batch(world_size=1, block_size=128)


def resolve(user: dict | str, tmp_path, **train) -> tuple[dict, list[str]]:
    path = tmp_path / "ds.json"
    path.write_text(user if isinstance(user, str) else json.dumps(user))
    t = TrainConfig(**train)
    return resolve_user_config(t, deepspeed_config(t, t.batch(1, 128)), str(path))


def test_keys_the_params_do_not_own_pass_through_and_are_reported(tmp_path):
    user = {"zero_optimization": {"stage": "auto", "reduce_bucket_size": 5e7, "allgather_bucket_size": "auto"},
            "wall_clock_breakdown": True, "activation_checkpointing": {"partition_activations": True}}
    merged, added = resolve(user, tmp_path, zero_stage=1)
    assert merged["zero_optimization"] == {**ds_config(zero_stage=1)["zero_optimization"], "reduce_bucket_size": 5e7}
    assert merged["wall_clock_breakdown"] is True and merged["activation_checkpointing"] == {"partition_activations": True}
    assert merged["optimizer"] == ds_config(zero_stage=1)["optimizer"]
    assert added == ["zero_optimization.reduce_bucket_size: 50000000.0", "zero_optimization.allgather_bucket_size: auto (DeepSpeed's default)",
                     "wall_clock_breakdown: false -> true", "activation_checkpointing.partition_activations: true"]


def test_a_json_written_for_hugging_face_with_auto_and_equal_values_resolves_to_the_params(tmp_path):
    """The usual HF Trainer JSON: "auto" everywhere the Trainer fills in, or values equal to the params."""
    user = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": False}, "gradient_clipping": 0.5, "train_batch_size": "auto",
            "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": "auto",
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.9, 0.95], "eps": "auto", "weight_decay": "auto"}},
            "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto"}},
            "zero_optimization": {"stage": 2, "overlap_comm": True}}
    merged, _ = resolve(user, tmp_path, zero_stage=2, micro_batch_size=8, grad_clip=0.5, precision="fp32")
    expected = ds_config(zero_stage=2, micro_batch_size=8, grad_clip=0.5, precision="fp32")
    assert merged == {**expected, "zero_optimization": {**expected["zero_optimization"], "overlap_comm": True}}


@pytest.mark.parametrize("user, message", [
    ({"zero_optimization": {"stage": 2}}, r"zero_optimization.stage=2 where train.zero_stage gives 0"),
    ({"gradient_clipping": 0.0}, r"gradient_clipping=0.0 where train.grad_clip gives 1.0"),
    ({"bf16": {"enabled": True}}, r"bf16.enabled=true where train.precision gives false"),
    ({"optimizer": {"type": "SGD"}}, r"optimizer.type=\"SGD\" where train.optimizer gives \"AdamW\""),
    ({"optimizer": {"params": {"lr": 0.1, "weight_decay": 0.5}}}, r"optimizer.params.lr=0.1 where train.lr gives .*; optimizer.params.weight_decay=0.5 where train.weight_decay"),
    ({"optimizer": None}, r"optimizer=null, which must be an object"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, r"zero_optimization.offload_optimizer.device=\"cpu\" where train.offload_optimizer gives \"none\""),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 0.01}}}, r"a scheduler with values of its own"),
    ({"train_micro_batch_size_per_gpu": 64}, r"train_micro_batch_size_per_gpu=64 where train.micro_batch_size gives"),
])  # fmt: skip
def test_a_json_that_contradicts_the_params_is_one_message_naming_the_param(tmp_path, user, message):
    """Before, the JSON won silently: ZeRO 2 from the JSON on train.zero_stage: 0 turned clipping off and the checkpoint
    was read as ZeRO 0."""
    with pytest.raises(UserError, match=r"train.deepspeed_config: .*ds.json sets " + message):
        resolve(user, tmp_path)


def test_bad_json_files_are_named(tmp_path):
    with pytest.raises(UserError, match=r"ds.json:1: invalid JSON"):
        resolve('{"zero_optimization": {"stage": 1,}}', tmp_path)
    with pytest.raises(UserError, match="must hold a JSON object"):
        resolve("[1]", tmp_path)
    t = TrainConfig()
    with pytest.raises(UserError, match="not found"):
        resolve_user_config(t, deepspeed_config(t, t.batch(1, 128)), str(tmp_path / "missing.json"))


def test_launcher_command_from_params(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-1 slots=8\n")
    t = TrainConfig(launcher="deepspeed", hostfile=str(hostfile), num_gpus=8, num_nodes=1, master_port=29600, launcher_args=["--no_ssh_check"])
    cmd = launcher_command(t, ["--params", "params.yaml"])
    assert cmd[0].endswith("deepspeed")
    assert cmd[1:] == [
        "--hostfile", str(hostfile), "--num_nodes", "1", "--num_gpus", "8", "--master_port", "29600", "--no_ssh_check",
        "--no_local_rank", "--module", "pipeline.train", "--params", "params.yaml",
    ]  # fmt: skip
    with pytest.raises(UserError, match="train.hostfile: .* not found"):
        launcher_command(TrainConfig(hostfile=str(tmp_path / "nope")), [])


def test_include_and_exclude_reach_the_launcher_and_do_not_mix_with_counts(tmp_path):
    cmd = launcher_command(TrainConfig(include="localhost:2,3", master_port=29600), [])
    assert cmd[1:5] == ["--include", "localhost:2,3", "--master_port", "29600"]
    (tmp_path / "hostfile").write_text("worker-1 slots=2\nworker-2 slots=2\n")
    cmd = launcher_command(TrainConfig(exclude="worker-2:0", hostfile=str(tmp_path / "hostfile")), [])
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
