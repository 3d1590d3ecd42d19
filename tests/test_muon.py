"""train.optimizer=muon through DeepSpeed's Muon (MuonWithAuxAdam): which parameters it updates, that ZeRO 0, 1 and 2
give the same run, that it learns, and that a resumed run is the uninterrupted one (docs/muon.md)."""

import math
import shutil

import pytest
import torch
from conftest import exported_weights, logged, run_training, tiny_params

from pipeline import params
from pipeline.config.model import ModelConfig
from pipeline.config.train import TrainConfig
from pipeline.errors import UserError
from pipeline.model.build import build_model
from pipeline.train.optimizer import hidden_matrices, param_groups

MUON = dict(optimizer="muon", muon_lr=0.02, lr=3e-3, max_steps=16, log_interval=1, eval_interval=8, save_interval=8)


def tiny_model(arch: str):
    m = ModelConfig(arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=32)
    return build_model(m, vocab_size=65, eot_id=0)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest_with_the_update_size_of_nn_linear():
    gpt2 = tiny_model("gpt2")
    hidden = hidden_matrices(gpt2)
    # Every 2-D weight of the blocks, none of the embeddings (wte is also the tied output head) or 1-D parameters.
    assert set(hidden) == {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    # GPT-2's Conv1D holds (in, out): the factor gives each the scale nn.Linear (out, in) gets, as the recipe has it.
    assert hidden["transformer.h.0.mlp.c_fc.weight"] == pytest.approx(2.0)  # (128 out, 32 in): sqrt(4), DeepSpeed gives 1
    assert hidden["transformer.h.0.mlp.c_proj.weight"] == pytest.approx(0.5)  # (32, 128): 1, DeepSpeed gives 2
    assert hidden["transformer.h.0.attn.c_attn.weight"] == pytest.approx(math.sqrt(3))
    assert hidden["transformer.h.0.attn.c_proj.weight"] == pytest.approx(1.0)

    llama = tiny_model("llama")
    hidden = hidden_matrices(llama)
    assert "model.embed_tokens.weight" not in hidden and "lm_head.weight" not in hidden
    assert all(factor == 1.0 for factor in hidden.values())  # nn.Linear: DeepSpeed's orientation already
    assert len(hidden) == 2 * 7  # q, k, v, o, gate, up, down

    t = TrainConfig(**MUON, warmup_steps=2)
    groups = param_groups(gpt2, t)
    muon = [p for g in groups for p in g["params"] if p.use_muon]
    assert len(muon) == 8 and not gpt2.transformer.wte.weight.use_muon and not gpt2.transformer.wpe.weight.use_muon
    assert sum(len(g["params"]) for g in groups) == len(list(gpt2.parameters()))
    assert sorted(g["lr"] for g in groups if g["params"][0].use_muon) == pytest.approx([0.01, 0.02, 0.02 * math.sqrt(3), 0.04])
    adam = [g for g in groups if not g["params"][0].use_muon]
    assert [g["weight_decay"] for g in adam] == [0.1, 0.0] and all(g["lr"] == 3e-3 for g in adam)
    assert {g["weight_decay"] for g in groups if g["params"][0].use_muon} == {0.01}


def test_clipping_does_not_apply_to_muon_and_saying_it_should_is_one_message():
    assert TrainConfig(optimizer="muon").clip == 0.0  # the default grad_clip is not applied
    assert TrainConfig().clip == 1.0
    with pytest.raises(UserError, match="train.grad_clip: 0.5 does not apply with train.optimizer=muon"):
        params.validate_params({"train": {"optimizer": "muon", "grad_clip": 0.5}})


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_zero_0_to_3_give_the_same_muon_run_and_it_learns(tokens_dir, tmp_path, arch, capfd):
    losses = {}
    for stage in (0, 1, 2, 3):
        root = tmp_path / f"zero{stage}"
        run_training(tiny_params(tokens_dir, root, model={"arch": arch}, zero_stage=stage, **MUON))
        losses[stage] = torch.tensor(logged(root, "train/loss"))
    out = capfd.readouterr().out
    assert "optimizer Muon lr 2.00e-02, momentum 0.95" in out and "clip off" in out
    # Measured here: ZeRO 1 and 2 agree with ZeRO 0 to 1e-6; a wrong tag or a clipped update moves them by 0.1 or more.
    for stage in (1, 2):
        torch.testing.assert_close(losses[stage], losses[0], rtol=1e-4, atol=1e-4)
    # ZeRO 3 builds the model under zero.Init, whose initial weights are other draws of the same distributions
    # (tests/test_elastic.py): the same course, not the same numbers.
    assert abs(losses[3][-1] - losses[0][-1]) < 0.1, (losses[3], losses[0])
    # It learns: measured here 4.14 -> 3.48 in 16 steps; the update DeepSpeed's clipping shrank moved it by 0.05.
    assert losses[0][-1] < losses[0][0] - 0.4, losses[0]


def test_adamw_and_muon_runs_differ_and_an_adamw_run_keeps_its_identity(tokens_dir, tmp_path):
    from pipeline.checkpoints.run import run_identity

    p = params.validate_params(tiny_params(tokens_dir, tmp_path))
    batch = p.train.batch(1, p.model.block_size)
    identity = run_identity(p, {}, batch)
    assert not any(k.startswith("train.muon") or k == "train.optimizer" for k in identity)  # as before Muon existed
    muon = params.validate_params(tiny_params(tokens_dir, tmp_path, optimizer="muon"))
    assert run_identity(muon, {}, batch)["train.optimizer"] == "muon"


def test_a_resumed_muon_run_ends_with_exactly_the_weights_of_an_uninterrupted_one(tokens_dir, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_training(tiny_params(tokens_dir, full, zero_stage=1, **MUON))
    shutil.copytree(full / "checkpoints", cut / "checkpoints")
    (run,) = (cut / "checkpoints").glob("run-*")
    shutil.rmtree(run / "step-000016")
    (run / "latest").write_text("step-000008")
    summary = run_training(tiny_params(tokens_dir, cut, zero_stage=1, **MUON))
    assert summary["steps"] == 16
    a, b = exported_weights(full), exported_weights(cut)
    for key in a:
        assert torch.equal(a[key], b[key]), key  # the momentum buffers came back with the checkpoint
    assert logged(cut, "train/loss") == logged(full, "train/loss")


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_deepspeeds_optimizer_keeps_gptpipes_groups(zero_stage):
    """deepspeed.initialize re-tags parameters by name (GPT-2's wte and wpe would go to Muon): the engine's groups must
    hold gptpipe's split, each Muon group at its Conv1D-corrected lr, and the schedule must move every group alike."""
    from pipeline.infra.deepspeed import build_engine, engine_config, model_init, set_lr
    from pipeline.infra.distributed import init_distributed

    t = TrainConfig(**MUON, warmup_steps=2, zero_stage=zero_stage)
    init_distributed()
    torch.manual_seed(0)
    ds_config = engine_config(t, t.batch(1, 32))
    with model_init(ds_config, t.collective_timeout):
        model = tiny_model("gpt2")
    names = {id(p): n for n, p in model.named_parameters()}
    engine = build_engine(model, t, ds_config, param_groups(model, t))
    on_muon = {names[id(p)] for g in engine.optimizer.param_groups if g["use_muon"] for p in g["params"] if id(p) in names}
    on_adam = {names[id(p)] for g in engine.optimizer.param_groups if not g["use_muon"] for p in g["params"] if id(p) in names}
    if zero_stage == 0:  # ZeRO's groups hold flat partitions, not the module's parameters
        assert on_muon == set(hidden_matrices(model)) and "transformer.wte.weight" in on_adam and "transformer.wpe.weight" in on_adam
    assert not model.transformer.wte.weight.use_muon and model.transformer.h[0].mlp.c_fc.weight.use_muon
    lrs = sorted(g["lr"] for g in engine.optimizer.param_groups)
    assert lrs == pytest.approx(sorted([3e-3, 3e-3, 0.01, 0.02, 0.02 * math.sqrt(3), 0.04]))
    set_lr(engine, 3e-3 / 2)  # half way down the schedule: every group at half its peak
    assert sorted(g["lr"] for g in engine.optimizer.param_groups) == pytest.approx([lr / 2 for lr in lrs])


@pytest.mark.slow
def test_another_number_of_processes_is_refused_in_one_message_with_muon_and_zero(tokens_dir, tmp_path):
    """DeepSpeed cannot convert Muon's state to its universal format (ds_to_universal stops at 'exp_avg'): a Muon
    checkpoint of 2 processes resumed on 1 is one message naming the ways on, and nothing is converted."""
    from conftest import finish, launch

    elastic = dict(MUON, max_steps=4, global_batch_tokens=256, zero_stage=1)
    finish(launch(["--num_gpus", "2", "--master_port", "29871"], tiny_params(tokens_dir, tmp_path, **elastic), tmp_path))
    with pytest.raises(UserError, match="with train.optimizer=muon and ZeRO a checkpoint resumes on the number of processes that saved it"):
        run_training(tiny_params(tokens_dir, tmp_path, **dict(elastic, max_steps=8)))
    (run,) = (tmp_path / "checkpoints").glob("run-*")
    assert not (run / "universal").exists()
