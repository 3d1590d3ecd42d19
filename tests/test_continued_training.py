"""model.init naming a gptpipe training checkpoint or run folder: continued training (nanoGPT's sequential
fine-tuning) from one's own run, with the tokenizer it was trained with (issue 21)."""

import json

import pytest
from conftest import run_training, tiny_params

from pipeline import params
from pipeline.config.prepare import PrepareConfig
from pipeline.config.tokenize import TokenizeConfig
from pipeline.errors import UserError
from pipeline.prepare.stage import prepare_corpus
from pipeline.tokenize.stage import tokenize_corpus


def continued(tokens_dir, tmp_path, init, **train):
    raw = tiny_params(tokens_dir, tmp_path, eval_at_start=True, **train)
    raw["model"] = {"init": str(init), "block_size": 32}  # the shape is the checkpoint's own
    return raw


def val_losses(run_dir) -> list[float]:
    rows = (run_dir / "metrics" / "plots" / "metrics" / "val" / "loss.tsv").read_text().splitlines()
    return [float(row.split("\t")[-1]) for row in rows[1:]]


def test_a_step_folder_and_a_run_folder_continue_from_their_weights(tokens_dir, tmp_path):
    first = tmp_path / "first"
    run_training(tiny_params(tokens_dir, first, max_steps=8, eval_interval=8, save_interval=8))
    (run,) = (first / "checkpoints").glob("run-*")
    step = run / "step-000008"
    assert step.is_dir()

    second = tmp_path / "second"
    run_training(continued(tokens_dir, second, step, max_steps=2))
    # The evaluation before its first step scores the checkpoint's weights: the first run's last val loss.
    assert val_losses(second)[0] == pytest.approx(val_losses(first)[-1], abs=1e-5)
    assert json.loads((second / "final" / "config.json").read_text())["n_layer"] == 2

    third = tmp_path / "third"
    run_training(continued(tokens_dir, third, run, max_steps=2))  # a run folder: its newest intact step
    assert val_losses(third)[0] == pytest.approx(val_losses(first)[-1], abs=1e-5)


def test_other_token_ids_are_one_message_and_tokenize_can_reuse_the_checkpoints_tokenizer(tokens_dir, tmp_path, shared_data):
    first = tmp_path / "first"
    run_training(tiny_params(tokens_dir, first, max_steps=4, eval_interval=4, save_interval=4))
    (run,) = (first / "checkpoints").glob("run-*")

    # A new corpus with characters of its own: a char tokenizer trained on it gives other ids.
    corpus = tmp_path / "new.txt"
    corpus.write_text("Zebras quizzically vexed 1234567890 jumping foxes!\n\n" * 50)
    prepared = tmp_path / "prepared"
    prepare_corpus(PrepareConfig.model_validate({"source": {"kind": "files", "path": str(corpus), "separator": "\n\n"},
                                                "out_dir": str(prepared), "val_fraction": 0.2, "dedup": False}))
    fresh = tmp_path / "tokens-fresh"
    tokenize_corpus(TokenizeConfig(kind="char", out_dir=str(fresh)), prepared)
    with pytest.raises(UserError, match=r"was trained on other token ids \(.*char.* tokenize with its tokenizer \(tokenize.kind=char, tokenize.pretrained="):
        run_training(continued(fresh, tmp_path / "mismatch", run, max_steps=2))

    reused = tmp_path / "tokens-reused"
    tokenize_corpus(TokenizeConfig(kind="char", out_dir=str(reused), pretrained=str(run)), prepared)
    summary = run_training(continued(reused, tmp_path / "continued", run, max_steps=2))
    assert summary["steps"] == 2

    with pytest.raises(UserError, match=r"is of kind char, not tokenize.kind=bpe: set tokenize.kind=char"):
        tokenize_corpus(TokenizeConfig(kind="bpe", out_dir=str(tmp_path / "t"), pretrained=str(run)), prepared)
    with pytest.raises(UserError, match=r"holds no gptpipe tokenizer"):
        tokenize_corpus(TokenizeConfig(kind="char", out_dir=str(tmp_path / "t"), pretrained=str(tmp_path)), prepared)


def test_a_checkpoint_init_needs_no_hf_tokenizer_but_a_plain_folder_still_does(tokens_dir, tmp_path):
    first = tmp_path / "first"
    run_training(tiny_params(tokens_dir, first, max_steps=4, eval_interval=4, save_interval=4))
    (run,) = (first / "checkpoints").glob("run-*")
    params.validate_params({"tokenize": {"kind": "char"}, "model": {"init": str(run)}})
    with pytest.raises(UserError, match=r"tokenize.kind: is 'char' but model.init=.* is a pretrained checkpoint"):
        params.validate_params({"tokenize": {"kind": "char"}, "model": {"init": str(tmp_path)}})
