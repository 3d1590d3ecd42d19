"""Training through real DeepSpeed on CPU: ZeRO stages, precision, data parallel equivalence, resume, export."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import clean_env, exported_weights, finish, launch, logged, run_training, saved_world_size, tiny_params

from pipeline import params
from pipeline.config.model import GPT2_PRESETS
from pipeline.errors import UserError
from pipeline.train.loop import train


@pytest.mark.parametrize(
    "zero_stage,precision,checkpointing", [(0, "fp32", False), (1, "fp32", False), (2, "bf16", False), (3, "fp32", True), (0, "bf16", True)]
)
def test_each_zero_stage_trains_and_the_loss_falls(tokens_dir, tmp_path, zero_stage, precision, checkpointing):
    summary = run_training(
        tiny_params(tokens_dir, tmp_path, zero_stage=zero_stage, precision=precision, activation_checkpointing=checkpointing)
    )
    losses = logged(tmp_path, "train/loss")
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 0.3, losses
    assert summary["steps"] == 16 and summary["val loss"] < 4.0
    assert (tmp_path / "final" / "model.safetensors").is_file()
    ds_config = json.loads(next((tmp_path / "checkpoints").glob("run-*/ds_config.json")).read_text())
    assert ds_config["zero_optimization"]["stage"] == zero_stage
    assert ds_config["bf16"]["enabled"] == (precision == "bf16")


def test_resumed_run_ends_with_exactly_the_weights_of_an_uninterrupted_run(tokens_dir, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_training(tiny_params(tokens_dir, full, save_interval=4, model={"dropout": 0.1}))
    # The state a run killed after step 8 leaves on disk: checkpoints up to step 8, `latest` at step 8.
    shutil.copytree(full / "checkpoints", cut / "checkpoints")
    (run,) = (cut / "checkpoints").glob("run-*")
    for late in ("step-000012", "step-000016"):
        shutil.rmtree(run / late)
    (run / "latest").write_text("step-000008")
    summary = run_training(tiny_params(tokens_dir, cut, save_interval=4, model={"dropout": 0.1}))
    assert summary["steps"] == 16
    a, b = exported_weights(full), exported_weights(cut)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The curves come back with the checkpoint: the resumed run's history is the uninterrupted one's.
    for name in ("train/loss", "val/loss"):
        assert logged(cut, name) == logged(full, name), name


def test_changing_max_steps_resumes_but_changing_lr_starts_fresh(tokens_dir, tmp_path, capfd):
    run_training(tiny_params(tokens_dir, tmp_path, max_steps=8))
    run_training(tiny_params(tokens_dir, tmp_path, max_steps=12))
    assert "resuming" in capfd.readouterr().out
    runs = list((tmp_path / "checkpoints").glob("run-*"))
    assert len(runs) == 1 and (runs[0] / "step-000012" / "state.json").is_file()
    run_training(tiny_params(tokens_dir, tmp_path, max_steps=12, lr=1e-3))
    out = capfd.readouterr().out
    assert "starting fresh" in out and "train.lr 0.003 -> 0.001" in out
    assert len(list((tmp_path / "checkpoints").glob("run-*"))) == 2  # the earlier run is kept


def test_keeps_the_last_k_checkpoints_plus_the_best(tokens_dir, tmp_path):
    run_training(tiny_params(tokens_dir, tmp_path, save_interval=2, keep_last=2))
    (run,) = (tmp_path / "checkpoints").glob("run-*")
    tags = sorted(d.name for d in run.glob("step-*"))
    best = (run / "best").read_text().strip()
    assert set(tags) == {"step-000014", "step-000016", best}
    assert (run / "latest").read_text().strip() == "step-000016"
    state = json.loads((run / "step-000016" / "state.json").read_text())
    assert state["step"] == 16 and state["params"]["train"]["max_steps"] == 16 and state["best_tag"] == best


def test_exported_folder_reloads_in_plain_transformers_with_identical_logits(tokens_dir, tmp_path):
    run_training(tiny_params(tokens_dir, tmp_path, max_steps=4, model={"arch": "llama"}))
    (run,) = (tmp_path / "checkpoints").glob("run-*")
    # The checkpoint's own weights, loaded without the export path.
    module = torch.load(run / "step-000004" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    from transformers import AutoConfig, AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "final"))
    reference.load_state_dict(module)
    ids = torch.randint(0, 60, (2, 16))
    expected = reference(input_ids=ids).logits
    # A fresh interpreter that imports only transformers.
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM;"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); ids = torch.load(sys.argv[2]);"
        "torch.save(m(input_ids=ids).logits, sys.argv[3]); print(sorted(k for k in sys.modules if k.startswith('pipeline')))"
    )
    torch.save(ids, tmp_path / "ids.pt")
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "final"), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )  # fmt: skip
    assert out.stdout.strip() == "[]"
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


# ------------------------------------------------------------------------------------- the launcher


@pytest.mark.slow
def test_two_processes_equal_one_process_with_twice_the_accumulation(tokens_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    run_training(tiny_params(tokens_dir, one, max_steps=8, grad_accum=2))
    # Through the stage command with train.launcher=deepspeed: it re-launches itself on 2 processes.
    params = tiny_params(tokens_dir, two, max_steps=8, grad_accum=1, launcher="deepspeed", num_gpus=2, master_port=29631)
    (two / "params.yaml").write_text(yaml.safe_dump(params))
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--params", "params.yaml"], cwd=two, capture_output=True, text=True, env=clean_env()
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "launching" in out.stderr
    (run,) = (two / "checkpoints").glob("run-*")
    assert saved_world_size(run) == 2
    a, b = exported_weights(one), exported_weights(two)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logged(one, "train/loss"), logged(two, "train/loss"), rtol=1e-5, atol=1e-5)
    # The val windows are the same whatever the world size, so the same weights score the same val loss.
    torch.testing.assert_close(logged(one, "val/loss"), logged(two, "val/loss"), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_two_simulated_nodes_on_localhost_match_one_process(tokens_dir, tmp_path):
    one, nodes = tmp_path / "one", tmp_path / "nodes"
    one.mkdir(), nodes.mkdir()
    run_training(tiny_params(tokens_dir, one, max_steps=8, grad_accum=2))
    (nodes / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    params = tiny_params(tokens_dir, nodes, max_steps=8, grad_accum=1)
    common = ["--hostfile", str(nodes / "hostfile"), "--no_ssh", "--num_nodes", "2", "--master_addr", "127.0.0.1", "--master_port", "29641"]
    procs = [launch([*common, "--node_rank", str(r)], params, nodes) for r in (0, 1)]
    for proc in procs:
        finish(proc)
    a, b = exported_weights(one), exported_weights(nodes)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_readme_hostfile_command_runs_on_one_machine_without_sshd(tokens_dir, tmp_path):
    """`deepspeed --hostfile hostfile --no_ssh_check --master_addr 127.0.0.1 --module pipeline.train` with `localhost slots=2`."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    run_training(tiny_params(tokens_dir, one, max_steps=4, grad_accum=2))
    (two / "hostfile").write_text("localhost slots=2\n")
    args = ["--hostfile", str(two / "hostfile"), "--no_ssh_check", "--master_addr", "127.0.0.1", "--master_port", "29701"]
    finish(launch(args, tiny_params(tokens_dir, two, max_steps=4, grad_accum=1), two))
    a, b = exported_weights(one), exported_weights(two)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_hostfile_from_params_with_include_launches_the_same_run(tokens_dir, tmp_path):
    """The same through params: train.launcher=deepspeed, train.hostfile, train.include and the launcher flags."""
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    raw = tiny_params(tokens_dir, tmp_path, max_steps=4, grad_accum=1, launcher="deepspeed", hostfile=str(tmp_path / "hostfile"),
                      include="localhost:0,1", master_port=29711, launcher_args=["--no_ssh_check", "--master_addr", "127.0.0.1"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-m", "pipeline.train", "--params", "params.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, env=clean_env())
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "--include localhost:0,1" in out.stderr
    (run,) = (tmp_path / "checkpoints").glob("run-*")
    assert saved_world_size(run) == 2


@pytest.mark.slow
def test_a_node_local_out_dir_stops_the_run_with_a_message(tokens_dir, tmp_path):
    """Two simulated nodes each in its own directory, so `checkpoints` is a different folder on each: node-local."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
        (node / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    raw = tiny_params(tokens_dir, tmp_path, max_steps=4, grad_accum=1)
    raw["train"]["out_dir"] = "checkpoints"  # relative: each node's own
    common = ["--hostfile", "hostfile", "--no_ssh", "--num_nodes", "2", "--master_addr", "127.0.0.1", "--master_port", "29721"]
    procs = [launch([*common, "--node_rank", str(r)], raw, node) for r, node in enumerate(nodes)]
    outs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert all(proc.returncode != 0 for proc in procs)
    assert "train.out_dir=checkpoints must be on storage every node sees (a shared file system): rank 1 on" in outs[1]
    assert not (nodes[1] / "checkpoints" / "run.json").exists()


def test_inconsistent_batch_keys_are_one_clear_error(tokens_dir, tmp_path):
    with pytest.raises(UserError, match=r"train.global_batch_tokens=1000 must equal train.micro_batch_size \(4\)"):
        run_training(tiny_params(tokens_dir, tmp_path, global_batch_tokens=1000))


def test_a_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tokens_dir, tmp_path):
    # An absurd learning rate without clipping: the first step is fine, the weights it leaves are not.
    with pytest.raises(UserError, match=r"the loss is (nan|inf) at step 2; stopped without saving.*step-000001"):
        run_training(tiny_params(tokens_dir, tmp_path, max_steps=8, warmup_steps=0, lr=1e30, min_lr=0, grad_clip=0, save_interval=1))
    (run,) = (tmp_path / "checkpoints").glob("run-*")
    assert (run / "latest").read_text().strip() == "step-000001"
    assert not (run / "step-000002").exists()


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_sample_ad_hoc_from_a_checkpoint_or_the_export(tokens_dir, tmp_path, zero_stage, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.model.inference import load_for_inference

    raw = tiny_params(tokens_dir, tmp_path, max_steps=4, zero_stage=zero_stage)
    run_training(raw)
    (run,) = (tmp_path / "checkpoints").glob("run-*")
    from_checkpoint, _ = load_for_inference(run)  # the run folder: its latest checkpoint
    exported, tokenizer = load_for_inference(tmp_path / "final")
    ids = torch.tensor([tokenizer.encode("ROMEO: good")])
    torch.testing.assert_close(from_checkpoint(input_ids=ids).logits, exported(input_ids=ids).logits)

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    for model in (str(run / "step-000004"), str(tmp_path / "final")):
        result = CliRunner().invoke(app, ["sample", "--prompt", "ROMEO:", "--model", model, "-S", "sample.max_new_tokens=8"])
        assert result.exit_code == 0, result.output
        assert "ROMEO:" in result.output
    assert not (tmp_path / "reports").exists()  # ad hoc sampling writes no files


@pytest.mark.slow
def test_evaluate_split_over_two_ranks_equals_one_process(tokens_dir, tmp_path):
    from pipeline.eval.stage import evaluate_model as evaluate

    raw = tiny_params(tokens_dir, tmp_path, max_steps=2)
    run_training(raw)
    raw["evaluate"] = {"metrics_file": str(tmp_path / "one.json"), "batch_size": 3}
    single = evaluate(params.validate_params(raw))
    raw["evaluate"]["metrics_file"] = str(tmp_path / "two.json")
    finish(launch(["--num_gpus", "2", "--master_port", "29651"], raw, tmp_path, module="pipeline.eval"))
    double = json.loads((tmp_path / "two.json").read_text())
    assert double["val"]["tokens"] == single["val"]["tokens"]
    for key in ("loss", "bits_per_byte", "token_accuracy"):
        assert double["val"][key] == pytest.approx(single["val"][key], rel=1e-6)


def test_a_checkpoint_stands_alone_after_its_tokens_are_deleted(tokens_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.model.inference import load_for_inference

    tokens = tmp_path / "tokens"
    shutil.copytree(tokens_dir, tokens)
    run_training(tiny_params(tokens, tmp_path, max_steps=4, tokenize={"kind": "char", "out_dir": str(tokens)}))
    (run,) = (tmp_path / "checkpoints").glob("run-*")
    shutil.rmtree(tokens)
    elsewhere = tmp_path / "elsewhere"  # another working directory, without a params.yaml
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model, tokenizer = load_for_inference(run / "step-000004")
    assert tokenizer.decode(tokenizer.encode("ROMEO: good")) == "ROMEO: good"
    args = ["sample", "--prompt", "ROMEO:", "--model", str(run / "step-000004"), "-S", "sample.max_new_tokens=8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "ROMEO:" in result.output


def test_a_preset_gives_train_evaluate_and_sample_one_context_length(tokens_dir, tmp_path, monkeypatch):
    from pipeline.eval.stage import evaluate_model as evaluate
    from pipeline.model.build import model_context
    from pipeline.model.inference import load_for_inference
    from pipeline.sample.stage import generate_samples

    # A preset's shape, made tiny so the real stages run here: what matters is that each stage reads it.
    monkeypatch.setitem(GPT2_PRESETS, "gpt2-124m", {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 48})
    raw = tiny_params(tokens_dir, tmp_path, max_steps=2, save_interval=2)
    raw["model"] = {"preset": "gpt2-124m"}
    raw["evaluate"] = {"metrics_file": str(tmp_path / "metrics.json"), "max_windows": 4}
    raw["sample"] = {"num_samples": 1, "max_new_tokens": 60, "prompts": ["ROMEO:"], "out_dir": str(tmp_path), "stop_at_eot": False}
    p = params.validate_params(raw)
    assert p.model.block_size == 48 and p.eval_block_size == 48
    summary = train(p)
    assert summary["tokens seen"] == 2 * 4 * 48  # steps x micro batch x context
    assert evaluate(p)["val"]["block_size"] == 48
    model, _ = load_for_inference(tmp_path / "final")
    assert model_context(model) == 48
    assert generate_samples(p)[0]["tokens"] == 60  # past the context: sampling crops to the same 48 tokens
    with pytest.raises(UserError, match=r"model.preset: gpt2-124m is a shape to train from scratch, but model.init='gpt2'"):
        params.validate_params({"model": {"preset": "gpt2-124m", "init": "gpt2"}, "tokenize": {"kind": "hf", "pretrained": "gpt2"}})


def test_training_builds_no_deepspeed_op_and_each_environment_has_its_own_op_folder(tokens_dir, tmp_path):
    """DeepSpeed's CPU shared-memory op serves only its inference all-reduce: a training process builds and loads
    nothing, so two environments used in turn never rebuild it for each other (they did: 20-57 s a time). Ops that
    are built (offload's cpu_adam) go to a folder per environment."""
    import site

    from conftest import ROOT

    from pipeline.infra.deepspeed_fixes import extensions_dir

    # A second environment at another path: a venv whose packages are this one's, through a .pth file.
    other = tmp_path / "other-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(other)], check=True)
    (next(other.glob("lib/python*/site-packages")) / "this.pth").write_text("\n".join([*site.getsitepackages(), str(ROOT)]) + "\n")
    env = {k: v for k, v in clean_env().items() if k != "TORCH_EXTENSIONS_DIR"}
    theirs = subprocess.run([str(other / "bin" / "python"), "-c", "from pipeline.infra.deepspeed_fixes import extensions_dir; print(extensions_dir())"],
                            capture_output=True, text=True, check=True, env=env)
    assert theirs.stdout.strip() != str(extensions_dir()) and "/torch_extensions/" in theirs.stdout

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(tokens_dir, tmp_path, max_steps=2)))
    run = subprocess.run([str(other / "bin" / "python"), "-m", "pipeline.train", "--params", "params.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, env={**env, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "built successfully" not in run.stdout + run.stderr
    assert not (tmp_path / "ext").exists() or not any((tmp_path / "ext").iterdir()), "an op was built"
