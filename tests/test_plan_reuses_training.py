"""The tools predict training with training's own code (issue 30): `doctor` and `plan` share one parameter and
memory model (the same vocabulary, Muon counted), plan's ETA counts the evaluations and saves the real Cadence
makes, and plan's probe switches off every interval the schema marks as a cadence field, a new one too."""

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import logged, run_training, tiny_params
from pydantic import Field

from pipeline import params
from pipeline.config.all import Params
from pipeline.config.train import TrainConfig
from pipeline.layout import TrainMetrics
from pipeline.tools import plan as plan_module
from pipeline.tools.doctor import run_checks
from pipeline.tools.plan import Probe, eta, make_plan
from pipeline.train.cadence import Cadence

# GPT-2 124M's layers on the meta device: big enough that doctor's rounded figures (0.1M parameters, 0.01 GB)
# tell the vocabularies and optimizers apart, and nothing is allocated.
GPT2_SHAPE = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 128}


# ----------------------------------------------------------------- (a) one parameter and memory model


def tokenizer_settings(kind: str, tmp_path: Path) -> dict:
    """tokenize.* of each kind, pointing at a folder that is not tokenized: the vocabulary comes from the tokenizer."""
    out = {"out_dir": str(tmp_path / "not-tokenized")}
    if kind == "hf":
        from test_tokenizers import hf_folder

        return {"kind": "hf", "pretrained": str(hf_folder(tmp_path)), **out}
    if kind == "bpe":
        return {"kind": "bpe", "vocab_size": 1000, **out}
    return {"kind": kind, **out}


CASES = {
    "char": ("char", {}),
    "bpe": ("bpe", {}),
    "hf": ("hf", {}),
    "tiktoken": ("tiktoken", {}),
    "char, muon": ("char", {"optimizer": "muon"}),
    "tiktoken, muon, bf16, ZeRO 1": ("tiktoken", {"optimizer": "muon", "precision": "bf16", "zero_stage": 1}),
    "tiktoken, ZeRO 2 fp32": ("tiktoken", {"zero_stage": 2}),
}


def doctor_disk_figures(p: Params) -> tuple[str, str]:
    """(parameters, GB per checkpoint) as doctor's disk check words them."""
    detail = dict((name, detail) for name, _, detail in run_checks(p))["disk"]
    found = re.search(r"a checkpoint of ([\d,.]+M) parameters is about ([\d,.]+ GB)", detail)
    assert found, detail
    return found.group(1), found.group(2)


@pytest.mark.parametrize("case", CASES)
def test_doctor_and_plan_count_the_same_parameters_and_checkpoint_bytes(case, tmp_path):
    """Before: doctor guessed GPT-2's 50,257 ids for every tokenizer but bpe and took 16 or 18 bytes a parameter
    whatever the optimizer; plan read the tokenizer and counted Muon's one momentum."""
    kind, train = CASES[case]
    p = params.validate_params(tiny_params(tmp_path, tmp_path, model=GPT2_SHAPE, tokenize=tokenizer_settings(kind, tmp_path), **train))
    plan = make_plan(p)
    parameters, gb = doctor_disk_figures(p)
    assert parameters == f"{plan.shape.n_params / 1e6:,.1f}M"
    if p.train.zero_stage == 0:  # one process, nothing split: a checkpoint holds the training state plan counts in memory
        assert gb == f"{(plan.memory['weights'] + plan.memory['optimizer state']) / 1e9:,.2f} GB"
    assert gb == f"{plan.checkpoint / 1e9:,.2f} GB"

    from pipeline.tools.doctor_machine import checkpoint_estimate

    assert checkpoint_estimate(p) == (plan.shape.n_params, plan.checkpoint)  # exactly, not only as worded


def test_doctor_reads_the_vocabulary_of_the_tokenized_data_as_plan_does(tokens_dir, tmp_path):
    p = params.validate_params(tiny_params(tokens_dir, tmp_path, model=GPT2_SHAPE))
    plan = make_plan(p)
    assert plan.shape.vocab < 1000  # the characters of tiny Shakespeare, padded
    parameters, gb = doctor_disk_figures(p)
    assert parameters == f"{plan.shape.n_params / 1e6:,.1f}M" and gb == f"{plan.checkpoint / 1e9:,.2f} GB"


@pytest.mark.parametrize("train", [{"optimizer": "muon"}, {"zero_stage": 1}], ids=["muon", "zero 1"])
def test_the_checkpoint_estimate_is_what_deepspeed_writes(tokens_dir, tmp_path, train):
    """The bytes of a real step folder (weights, optimizer state, with ZeRO the fp32 copy) within 5% of the estimate."""
    raw = tiny_params(tokens_dir, tmp_path, model={"n_embd": 128, "n_head": 4}, max_steps=2, eval_interval=2, save_interval=2, **train)
    run_training(raw)
    (step,) = [d for d in (tmp_path / "checkpoints").rglob("step-*") if d.is_dir()]
    written = sum(f.stat().st_size for f in step.rglob("*") if f.is_file())
    assert make_plan(params.validate_params(raw)).checkpoint == pytest.approx(written, rel=0.05)


# ------------------------------------------------------------------------- (b) the ETA replays Cadence


def counted_by_eta(p: Params, steps: int) -> tuple[int, int]:
    """(evaluations, saves) that plan's ETA adds up, read back from it with a probe whose only costs are an
    evaluation of 1 s and a save of 1000 s."""
    probe = Probe(steps=1, seconds_per_step=0.0, wall_s=0.0, seconds={"eval": 1.0, "save": 1000.0}, peak_memory=0.0)
    total = round(eta(p, steps, probe))
    return total % 1000 + 1, total // 1000 + 1


def replayed(t: TrainConfig, steps: int) -> tuple[int, int]:
    """(evaluations, saves) of training's loop over the real Cadence: a save is an evaluation too, one before the first
    step with eval_at_start, and with export: best each evaluation may improve and save (counted as if it did)."""
    cadence, evals, saves = Cadence(t, steps), int(t.eval_at_start), 0
    for step in range(1, steps + 1):
        due = cadence.after(step)
        evals += due.eval
        saves += due.save or (due.eval and t.export == "best")
    return evals, saves


INTERVALS = {
    # the saves between evaluations are evaluations too (a checkpoint records its val loss): plan missed them before
    "save 4, eval 6": dict(eval_interval=6, save_interval=4, export="last"),
    "save 30, eval 100, best": dict(eval_interval=100, save_interval=30, export="best"),
    "save 7, eval 5, at start": dict(eval_interval=5, save_interval=7, export="last", eval_at_start=True),
    "save only at the end": dict(eval_interval=10, save_interval=0, export="last"),
    "defaults": {},
    "eval 50, save 100, best": dict(eval_interval=50, save_interval=100, export="best"),
}


@pytest.mark.parametrize("case", INTERVALS)
@pytest.mark.parametrize("steps", [12, 200, 301])
def test_the_eta_counts_the_evaluations_and_saves_the_real_cadence_makes(case, steps, tmp_path):
    p = Params(train={**INTERVALS[case], "max_steps": steps, "warmup_steps": 0})
    assert counted_by_eta(p, steps) == replayed(p.train, steps)


def test_the_counts_are_what_a_real_run_does(tokens_dir, tmp_path):
    """Evaluations logged, checkpoints written and sample rounds of a real run, against plan's count of them."""
    raw = tiny_params(tokens_dir, tmp_path, max_steps=12, eval_interval=6, save_interval=4, export="last", keep_last=100,
                      eval_at_start=True, sample_interval=5, sample_max_new_tokens=2)
    p = params.validate_params(raw)
    run_training(raw)
    evaluated, saved = logged(tmp_path, "val/loss"), [d for d in (tmp_path / "checkpoints").rglob("step-*") if d.is_dir()]
    assert (len(evaluated), len(saved)) == (5, 3)  # at the start, 4, 6, 8, 12; saves 4, 8, 12
    assert counted_by_eta(p, 12) == (5, 3)
    counted = plan_module.events(p.train, 12)
    sampled = {json.loads(line)["step"] for line in TrainMetrics(tmp_path / "metrics").samples.read_text().splitlines()}
    assert (counted.evals, counted.saves, counted.samples) == (5, 3, len(sampled)) == (5, 3, 3)  # samples at 5, 10, 12


# ------------------------------------------------------------------ (c) the probe switches off every cadence


class PlantedTrainConfig(TrainConfig):
    """A train section with an interval key added after the probe was written."""

    checkpoint_sync_interval: int | None = Field(
        25, ge=1, description="a new interval (planted by the test)", json_schema_extra={"keeps_run": True, "cadence": True})


def probe_params(p: Params, steps: int, tmp_path: Path, monkeypatch) -> dict:
    """The train.* section of the params file plan's probe hands to training (the run itself is not started)."""
    seen = {}

    def instead_of_training(cmd, cwd, sigterm):
        seen.update(yaml.safe_load(Path(cmd[cmd.index("--params") + 1]).read_text())["train"])
        raise RuntimeError("stop here: the params were read")

    monkeypatch.setattr(plan_module, "run_to_end", instead_of_training)
    with pytest.raises(RuntimeError, match="stop here"):
        plan_module.run_probe(p, tmp_path, steps)
    return seen


def test_the_probe_switches_off_a_newly_planted_interval(tmp_path, monkeypatch):
    p = Params()
    p.train = PlantedTrainConfig(hellaswag_interval=5, sample_interval=5)
    train = probe_params(p, 3, tmp_path, monkeypatch)
    assert "checkpoint_sync_interval" in train and train["checkpoint_sync_interval"] is None


def test_the_probe_switches_off_every_marked_field_and_keeps_what_it_times(tmp_path, monkeypatch):
    marked = TrainConfig.cadence_keys()
    assert {"log_interval", "eval_interval", "save_interval", "hellaswag_interval", "sample_interval"} <= set(marked), marked
    p = Params(train={"hellaswag_interval": 2, "sample_interval": 2, "eval_at_start": True, "log_interval": 7,
                      "eval_interval": 9, "save_interval": 11, "max_steps": 500})
    train = probe_params(p, 3, tmp_path, monkeypatch)
    timed = {"log_interval": 1, "eval_interval": 3, "save_interval": 3}
    for name in marked:
        assert train[name] == timed.get(name, train[name]) and (name in timed or train[name] in (None, False, 0)), (name, train[name])
    assert train["eval_at_start"] is False
    assert train["max_steps"] == 3 and train["epochs"] is None and train["resume"] == "never" and train["keep_last"] == 1
    scratch = Path(train["out_dir"]).parent
    assert scratch.name.startswith("gptpipe-probe-") and all(Path(train[key]).parent == scratch for key in ("export_dir", "metrics_dir"))
