"""Recipes and `gptpipe init`: every recipe validates, `recipe use` writes params.yaml without losing the user's
changes, each recipe's tiny variant runs end to end through the real stages, and a scaffolded project runs
`dvc repro` and the deepspeed launcher with the installed package, outside this checkout."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, clean_env, saved_world_size
from typer.testing import CliRunner

from pipeline import params
from pipeline.cli import app
from pipeline.tokens import open_tokens
from pipeline.tools import recipes
from pipeline.tools.dvc_yaml import render as render_dvc_yaml
from pipeline.tools.init import commented_params

runner = CliRunner()


def test_every_recipe_validates_and_has_a_header_saying_what_it_reproduces_needs_and_reached():
    assert recipes.names() == ["bpe-from-scratch", "finetune-gpt2", "finetune-gpt2-large", "finetune-gpt2-medium", "finetune-gpt2-xl",
                               "gemma-270m-multinode", "gpt2-124m", "shakespeare-char"]
    for name in recipes.names():
        text = recipes.text(name)
        params.validate_params(yaml.safe_load(text), source=name)
        header = text.split("\n\n")[0]
        assert header.startswith(f"# {name}: ") and all(k in header for k in ("# Reproduces:", "# Needs:", "# Reached here:")), name
        assert (ROOT / "recipes" / f"{name}.yaml").read_text() == text  # what the installed package ships


def test_the_fine_tune_recipes_differ_only_by_gpt2_size():
    """Issue 21: -S model.init=gpt2-xl kept gpt2's micro batch and ZeRO 0; each size has its own recipe, whose micro
    batch follows nanoGPT's configs (8/4/2/1) with the same global batch, and which is otherwise finetune-gpt2."""
    def flat(name):
        return {f"{section}.{k}": v for section, values in yaml.safe_load(recipes.text(name)).items() for k, v in values.items()}

    base = flat("finetune-gpt2")
    sizes = {"finetune-gpt2": ("gpt2", 8, 0), "finetune-gpt2-medium": ("gpt2-medium", 4, 0),
             "finetune-gpt2-large": ("gpt2-large", 2, 2), "finetune-gpt2-xl": ("gpt2-xl", 1, 2)}
    for name, (init, micro, zero) in sizes.items():
        p = flat(name)
        assert (p["model.init"], p["train.micro_batch_size"], p["train.zero_stage"]) == (init, micro, zero), name
        assert {k: v for k, v in p.items() if base.get(k) != v} == {k: p[k] for k in ("model.init", "train.micro_batch_size", "train.zero_stage")
                                                                   if p[k] != base[k]}, name
        batch = params.validate_params(yaml.safe_load(recipes.text(name))).train.batch(1, 1024)
        assert batch.global_size == 32 and batch.micro_batch_size * batch.grad_accum == 32, name
        assert "Memory: about " in recipes.text(name) and "GB" in recipes.text(name).split("Memory:")[1].split("\n")[0], name


def test_recipe_use_writes_params_keeps_comments_and_refuses_to_drop_changes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["recipe", "use", "shakespeare-char", "-S", "train.max_steps=500", "-S", "model.n_layer=6"])
    assert result.exit_code == 0, result.output
    written = (tmp_path / "params.yaml").read_text()
    assert "# Reproduces: nanoGPT's shakespeare_char" in written and "# val = the last 10% of the text" in written
    p = params.load_params(tmp_path / "params.yaml")
    assert p.train.max_steps == 500 and p.model.n_layer == 6 and p.prepare.split == "tail"
    (tmp_path / "params.yaml").write_text(written + "  # my own note\n")  # a change of the user's own, nothing else
    result = runner.invoke(app, ["recipe", "use", "bpe-from-scratch"])
    assert result.exit_code == 2 and "holds changes of your own" in result.output and "--force" in result.output
    assert (tmp_path / "params.yaml").read_text().endswith("  # my own note\n")
    assert runner.invoke(app, ["recipe", "use", "bpe-from-scratch", "--force"]).exit_code == 0
    assert (tmp_path / "params.yaml").read_text() == recipes.text("bpe-from-scratch")  # a shipped recipe: replaceable
    assert runner.invoke(app, ["recipe", "use", "gpt2-124m"]).exit_code == 0
    bad = runner.invoke(app, ["recipe", "use", "gpt2-124m", "--force", "-S", "train.lr=-1"])
    assert bad.exit_code == 2 and "train.lr" in bad.output
    assert "shakespeare-char" in runner.invoke(app, ["recipe", "list"]).output
    assert runner.invoke(app, ["recipe", "show", "finetune-gpt2"]).output == recipes.text("finetune-gpt2")


# ------------------------------------------------------------------------------ tiny variants, end to end


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A GPT-2-shaped checkpoint with GPT-2's vocabulary, standing in for the hub's gpt2."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("ckpt") / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory) -> Path:
    """A Gemma-3-shaped checkpoint (gemma3_text) with its own tokenizer, which starts documents with <bos>."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("ckpt") / "gemma"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = (ROOT.parent / "shared" / "data" / "tinyshakespeare.txt").read_text()[:50_000]
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>").save_pretrained(folder)
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=16,
                              bos_token_id=tok.token_to_id("<bos>"), eos_token_id=tok.token_to_id("<eos>"), pad_token_id=0)
    Gemma3ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


SMALL_TRAIN = ["train.max_steps=6", "train.warmup_steps=2", "train.eval_interval=3", "train.save_interval=3", "train.log_interval=3",
               "train.eval_batches=2", "train.micro_batch_size=2", "train.grad_accum=null", "train.global_batch_tokens=null",
               "evaluate.max_windows=8", "evaluate.batch_size=4", "sample.num_samples=1", "sample.max_new_tokens=8"]
SMALL_SCRATCH = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32"]


def tiny_variant(name: str, shared: Path, tiny_gpt2: Path, tiny_gemma: Path, text: Path) -> list[str]:
    """The recipe's own keys with tiny sizes and local data in place of downloads and hub weights."""
    local_text = ["prepare.source.kind=files", f"prepare.source.path={text}", 'prepare.source.separator="\\n\\n"']
    return {
        "shakespeare-char": ["prepare.source.kind=files", f"prepare.source.path={shared / 'tinyshakespeare.txt'}",
                             *SMALL_SCRATCH, *SMALL_TRAIN, "train.sample_interval=3"],
        "finetune-gpt2": [f"prepare.source.path={text}", f"model.init={tiny_gpt2}", "model.block_size=32", *SMALL_TRAIN,
                          "train.grad_accum=2", "train.eval_interval=2", "train.early_stopping_patience=2"],
        "gpt2-124m": [*local_text, "prepare.val_fraction=0.1", "model.preset=null", *SMALL_SCRATCH, *SMALL_TRAIN,
                      "train.global_batch_tokens=128", "train.warmup_steps=2", "train.hellaswag_interval=3", "train.hellaswag_limit=4",
                      "train.sample_interval=3", "train.sample_max_new_tokens=8", "evaluate.hellaswag_url=null",
                      f"evaluate.hellaswag={shared / 'hellaswag_val_sample.jsonl'}", "evaluate.hellaswag_limit=4"],
        "bpe-from-scratch": [f"prepare.source.path={text.parent}", *SMALL_SCRATCH, *SMALL_TRAIN, "train.save_interval=1", "train.keep_last=2"],
        "gemma-270m-multinode": [*local_text, "prepare.val_source=null", f"tokenize.pretrained={tiny_gemma}", f"model.init={tiny_gemma}",
                                 "model.block_size=32", *SMALL_TRAIN, "train.global_batch_tokens=128", "train.hostfile=hostfile",
                                 "train.master_port=29731", "train.launcher_args=[--no_ssh_check, --master_addr, 127.0.0.1]"],
    }[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shakespeare-char", "finetune-gpt2", "gpt2-124m", "bpe-from-scratch", "gemma-270m-multinode"])
def test_the_tiny_variant_of_each_recipe_runs_through_the_real_stages(name, tmp_path, monkeypatch, shared_data, tiny_gpt2, tiny_gemma):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # set by other tests' in-process training
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text").mkdir()
    text = tmp_path / "text" / "corpus.txt"
    text.write_text((shared_data / "tinyshakespeare.txt").read_text()[:60_000])
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    result = runner.invoke(app, ["recipe", "use", name, *[a for o in tiny_variant(name, shared_data, tiny_gpt2, tiny_gemma, text)
                                                            for a in ("-S", o)]])
    assert result.exit_code == 0, result.output
    for stage in ("prepare", "tokenize", "train", "evaluate", "sample", "report"):
        result = runner.invoke(app, [stage])
        assert result.exit_code == 0, f"{stage}:\n{result.output[-3000:]}"
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["val"]["loss"] > 0 and (tmp_path / "reports" / "report.html").is_file()
    exported = json.loads((tmp_path / "models" / "final" / "gptpipe.json").read_text())
    assert exported["step"] >= 1
    if name == "finetune-gpt2":  # the recipe exports the best checkpoint, and early stopping is on
        assert exported["exported"] == "best"
        train_summary = json.loads((tmp_path / "reports" / "train" / "metrics.json").read_text())
        assert train_summary["stopped"] == "max_steps" or train_summary["stopped"].startswith("stopped early")
    if name == "bpe-from-scratch":  # a checkpoint every train.save_interval, only the last keep_last (and the best) kept
        (run,) = (tmp_path / "checkpoints").glob("run-*")
        kept = sorted(d.name for d in run.glob("step-*"))
        best = (run / "best").read_text().strip()
        assert kept == sorted({"step-000005", "step-000006", best}), kept
    if name == "gpt2-124m":
        assert metrics["hellaswag"]["n"] == 4 and (tmp_path / "reports" / "plots" / "hellaswag.png").is_file()
    if name == "gemma-270m-multinode":
        from transformers import AutoTokenizer

        (run,) = (tmp_path / "checkpoints").glob("run-*")
        assert saved_world_size(run) == 2
        ids = open_tokens(tmp_path / "data" / "tokens" / "train-00000.bin").tokens
        assert int(ids[0]) == AutoTokenizer.from_pretrained(tiny_gemma).bos_token_id  # Gemma's documents start with <bos>


# ---------------------------------------------------------------------------------------- gptpipe init


def test_the_scaffold_has_the_same_stages_outputs_and_plots_as_this_repository():
    ours, theirs = yaml.safe_load((ROOT / "dvc.yaml").read_text()), yaml.safe_load(render_dvc_yaml(None))
    assert ours["plots"] == theirs["plots"] and list(ours["stages"]) == list(theirs["stages"])
    for stage, spec in ours["stages"].items():
        other = theirs["stages"][stage]
        assert other["cmd"] == f"gptpipe {stage}"
        assert [d for d in spec["deps"] if not d.endswith(".py")] == other["deps"], stage
        for key in ("params", "outs", "metrics"):
            assert spec.get(key) == other.get(key), (stage, key)


def test_every_single_key_a_stage_declares_is_written_out_for_dvc():
    """DVC refuses to run a stage whose declared params key is missing from params.yaml."""
    from pipeline.tools.dvc_yaml import declared_keys
    from pipeline.tools.recipes import names, render

    files = {"params.yaml": (ROOT / "params.yaml").read_text(), "gptpipe init": commented_params()}
    files.update({f"recipe {n}": render(n, []) for n in names()})
    assert declared_keys(), "no single keys: nothing to check"
    for what, text in files.items():
        raw = yaml.safe_load(text)
        missing = [k for k in declared_keys() if k.partition(".")[2] not in (raw.get(k.partition(".")[0]) or {})]
        assert not missing, f"{what} lacks {missing}"


def test_the_commented_params_are_every_default():
    raw = yaml.safe_load(commented_params())
    assert params.validate_params(raw) == params.validate_params({})
    assert "# bpe only: vocabulary size to train" in commented_params()


def gptpipe(*args: str, cwd: Path, env: dict) -> str:
    exe = Path(sys.executable).with_name("gptpipe")
    out = subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"gptpipe {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


@pytest.mark.slow
def test_init_makes_a_project_that_runs_dvc_repro_and_the_launcher_with_the_installed_package(tmp_path, shared_data):
    env = {**clean_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "GIT_AUTHOR_NAME": "CI",
           "GIT_AUTHOR_EMAIL": "ci@example.com", "GIT_COMMITTER_NAME": "CI", "GIT_COMMITTER_EMAIL": "ci@example.com"}
    gptpipe("init", "proj", "--recipe", "shakespeare-char", cwd=tmp_path, env=env)
    proj = tmp_path / "proj"
    assert {"dvc.yaml", "params.yaml", ".gitignore", ".dvcignore", "README.md", "data", ".dvc", ".git"} <= {p.name for p in proj.iterdir()}
    assert "dvc repro" in (proj / "README.md").read_text()
    shutil.copy(shared_data / "tinyshakespeare.txt", proj / "data" / "raw" / "input.txt")
    tiny = ["prepare.source.kind=files", "prepare.source.path=data/raw/input.txt", *SMALL_SCRATCH, *SMALL_TRAIN]
    gptpipe("recipe", "use", "shakespeare-char", *[a for o in tiny for a in ("-S", o)], cwd=proj, env=env)  # committed: replaceable
    out = subprocess.run([str(Path(sys.executable).with_name("dvc")), "repro"], cwd=proj, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for stage in ("prepare", "tokenize", "train", "evaluate", "sample", "report"):
        assert f"Running stage '{stage}'" in out.stdout
    assert "gptpipe train" in out.stdout and not (proj / "stages").exists()
    assert (proj / "reports" / "report.html").is_file()

    # Several processes from the hostfile, started the way the scaffold's README says: no script path needed.
    (proj / "hostfile").write_text("localhost slots=2\n")
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--hostfile", "hostfile", "--no_ssh_check", "--master_addr", "127.0.0.1",
           "--master_port", "29741", "--no_local_rank", "--module", "pipeline.cli", "train", "-S", "train.run_name=two"]
    out = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert saved_world_size(proj / "checkpoints" / "two") == 2
    # The same from params (train.launcher: deepspeed): gptpipe re-launches itself as the installed module.
    launched = ["train.launcher=deepspeed", "train.hostfile=hostfile", "train.launcher_args=[--no_ssh_check, --master_addr, 127.0.0.1]",
                "train.master_port=29743", "train.run_name=three"]
    out = gptpipe("train", *[a for o in launched for a in ("-S", o)], cwd=proj, env=env)
    assert "--no_local_rank --module pipeline.train" in out
    assert saved_world_size(proj / "checkpoints" / "three") == 2
