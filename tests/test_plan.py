"""`gptpipe plan`: the counts and the memory estimate against real runs of tiny models, the warning when a run will
not fit, and the probe's ETA against the real run it predicts."""

import subprocess
import sys
import time

import pytest
import yaml
from conftest import clean_env, tiny_params

from pipeline import params
from pipeline.model.build import build_model, count_params
from pipeline.tools.plan import eta, make_plan, run_probe


def plan_of(tokens_dir, tmp_path, processes=None, model=None, **train):
    return make_plan(params.validate_params(tiny_params(tokens_dir, tmp_path, model=model, **train)), processes)


def test_the_counts_are_the_models_and_each_zero_stage_splits_its_part(tokens_dir, tmp_path):
    p = params.validate_params(tiny_params(tokens_dir, tmp_path))
    plan = make_plan(p)
    meta = yaml.safe_load((tokens_dir / "meta.json").read_text())
    assert plan.shape.n_params == count_params(build_model(p.model, meta["vocab_size"], meta["eot_id"]))
    assert plan.tokens_per_step == 4 * 32 and plan.steps == 16 and plan.total_tokens == 16 * 4 * 32
    n = plan.shape.n_params
    assert plan.memory["weights"] == 4 * n and plan.memory["gradients"] == 4 * n and plan.memory["optimizer state"] == 8 * n
    assert plan.memory["runtime"] > 100e6  # torch, transformers and DeepSpeed loaded: hundreds of MB

    two = {stage: plan_of(tokens_dir, tmp_path, processes=2, zero_stage=stage).memory for stage in (0, 1, 2, 3)}
    assert two[1]["optimizer state"] == two[0]["optimizer state"] / 2 and two[1]["gradients"] == two[0]["gradients"]
    assert two[2]["gradients"] == two[0]["gradients"] / 2 and two[2]["weights"] == two[0]["weights"]
    assert two[3]["weights"] == two[0]["weights"] / 2

    bf16 = plan_of(tokens_dir, tmp_path, precision="bf16").memory
    assert bf16["weights"] == 2 * n and bf16["optimizer state"] == 12 * n  # fp32 masters and two moments
    muon = plan_of(tokens_dir, tmp_path, optimizer="muon")
    assert 0 < muon.shape.n_hidden < n and muon.memory["optimizer state"] == 8 * n - 4 * muon.shape.n_hidden
    offload = plan_of(tokens_dir, tmp_path, zero_stage=1, offload_optimizer=True)
    assert offload.memory["optimizer state"] == 0 and offload.cpu_offloaded == 8 * n
    checkpointed = plan_of(tokens_dir, tmp_path, model={"n_layer": 8}, activation_checkpointing=True).memory["activations"]
    assert checkpointed < plan_of(tokens_dir, tmp_path, model={"n_layer": 8}).memory["activations"]


def test_a_run_that_will_not_fit_is_one_line_naming_the_knob(tokens_dir, tmp_path):
    raw = tiny_params(tokens_dir, tmp_path, model={"n_layer": 48, "n_head": 32, "n_embd": 4096})  # 9.7B parameters in fp32
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "plan"], cwd=tmp_path, capture_output=True, text=True, env=clean_env())
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    (warning,) = [line for line in out.stderr.splitlines() if "will not fit" in line]
    assert "GB per process against" in warning and "train.precision=bf16" in warning, warning
    n = make_plan(params.validate_params(raw)).shape.n_params
    assert n > 9e9 and f"{n:,}" in out.stdout


def test_the_estimate_and_the_eta_hold_against_real_runs(tokens_dir, tmp_path):
    """The estimate within 25% of the probe's measured peak; the ETA of a run 100 times the probe within 25% of it."""
    raw = tiny_params(tokens_dir, tmp_path, max_steps=200, eval_interval=50, save_interval=100, log_interval=50)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    p = params.validate_params(raw)
    plan = make_plan(p)
    probe = run_probe(p, tmp_path, 2)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["params.yaml"]  # the probe wrote nothing into the project
    assert plan.total_memory == pytest.approx(probe.peak_memory, rel=0.25), (plan.memory, probe.peak_memory)

    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pipeline.train", "--params", "params.yaml"], cwd=tmp_path, capture_output=True,
                         text=True, env=clean_env())
    real = time.perf_counter() - start
    assert out.returncode == 0, out.stderr[-3000:]
    predicted = eta(p, 200, probe)
    print(f"ETA {predicted:.1f} s, real {real:.1f} s; memory estimate {plan.total_memory / 1e6:.0f} MB, measured {probe.peak_memory / 1e6:.0f} MB")
    assert predicted == pytest.approx(real, rel=0.25)
