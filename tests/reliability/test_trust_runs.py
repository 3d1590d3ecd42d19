"""Issue 29, the run and evaluate parts: a changed train.target_loss gets a record of its own, user code that calls
sys.exit cannot end a stage as if it had finished, and HellaSwag or lm-eval items too long for the model are said."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import clean_env, logged, run_training, tiny_params

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # test_evaluation's tiny models
from test_evaluation import SENTENCE, char_tokenizer, save_model_dir, tiny_gpt2, write_tokens_dir  # noqa: E402

from pipeline import params  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.eval.stage import evaluate_model  # noqa: E402

# ------------------------------------------------------------------------------------------ train.target_loss


def target_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics" / "metrics.json").read_text())["target"]


def test_a_changed_target_loss_gets_a_record_of_its_own(tokens_dir, tmp_path):
    """The target is not part of the run's identity, so changing it resumes the run: the record must then be the new
    target's (recomputed from the run's evaluations), never the old one's. Checked against runs that had the new
    target from their start."""
    raw = tiny_params(tokens_dir, tmp_path / "a", max_steps=16, eval_interval=4, save_interval=4, target_loss=100.0,
                      stop_at_target=True)
    assert run_training(raw)["steps"] == 4  # reached at the first evaluation

    def again(**train) -> dict:
        return run_training({**raw, "train": {**raw["train"], **train}})

    # A lower target that is never reached: the run trains on to the end and says so (before: nothing trained, and
    # metrics.json said 0.001 was "reached at step 4").
    summary = again(target_loss=0.001)
    assert summary["steps"] == 16 and summary["target"].startswith("val loss 0.001 not reached")
    assert target_of(tmp_path / "a") == {"loss": 0.001, "reached": False}

    # A target between: the record is the first evaluation at or below it, whichever target the run had before.
    losses = logged(tmp_path / "a", "val/loss")  # at steps 4, 8, 12, 16
    middle = sorted(losses)[1]
    first = next(i for i, v in enumerate(losses) if v <= middle)
    again(target_loss=middle, stop_at_target=False)
    record = target_of(tmp_path / "a")
    assert record["reached"] is True and record["loss"] == middle
    assert (record["step"], record["tokens"], record["val_loss"]) == (4 * (first + 1), 4 * (first + 1) * 128, losses[first])

    # The same target from a fresh run's start: the same step, tokens, FLOPs and val loss (CPU training is exact).
    fresh = tiny_params(tokens_dir, tmp_path / "b", max_steps=16, eval_interval=4, save_interval=4, target_loss=middle)
    run_training(fresh)
    reference = target_of(tmp_path / "b")
    for key in ("loss", "reached", "step", "tokens", "flops", "val_loss"):
        assert record[key] == reference[key], key

    # A target set only after the run finished: found in what the run already did, with nothing trained.
    run_training({**fresh, "train": {**fresh["train"], "target_loss": None}})
    run_training({**fresh, "train": {**fresh["train"], "target_loss": middle}})
    assert {k: target_of(tmp_path / "b")[k] for k in ("step", "tokens", "val_loss")} == {k: reference[k] for k in ("step", "tokens", "val_loss")}


# ------------------------------------------------------------------------------------- user code in evaluate


HOOKS = """\
import sys

def exits(model, tokenizer, val_tokens):
    sys.exit(0)

def not_a_number(model, tokenizer, val_tokens):
    return float("nan")

def fine(model, tokenizer, val_tokens):
    return 1.0
"""


@pytest.fixture
def eval_project(tmp_path, monkeypatch):
    tok = char_tokenizer()
    model_dir = save_model_dir(tmp_path / "model", tiny_gpt2(tok, n_positions=32), tok)
    tokens_dir = write_tokens_dir(tmp_path / "tokens", tok, [SENTENCE] * 4)
    (tmp_path / "trust_hooks.py").write_text(HOOKS)
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.chdir(tmp_path)
    raw = {"tokenize": {"kind": "char", "out_dir": str(tokens_dir)}, "model": {"block_size": 32}, "train": {"export_dir": str(model_dir)},
           "evaluate": {"metrics_file": str(tmp_path / "metrics.json")}}
    return tmp_path, raw


@pytest.mark.parametrize("hook, message", [
    ("trust_hooks:exits", r"trust_hooks:exits called sys.exit\(0\) before the stage wrote its metrics.*trust_hooks.py:4"),
    ("exits_on_import:f", r"importing exits_on_import called sys.exit\(0\)"),
    ("trust_hooks:not_a_number", r"trust_hooks:not_a_number returned nan; a metric must be a finite number"),
])  # fmt: skip
def test_a_hook_that_exits_or_returns_nan_is_one_message(eval_project, hook, message):
    _, raw = eval_project
    raw["evaluate"]["metrics"] = [hook]
    with pytest.raises(UserError, match=message):
        evaluate_model(params.validate_params(raw))


def test_sys_exit_in_a_hook_fails_the_stage_command_and_keeps_no_output_as_its_own(eval_project):
    """Through the real stage command, as DVC runs it: before, the stage exited 0 and the previous metrics.json stood
    as this run's. Now exit 2, one line, and the earlier file is left as it was (DVC records nothing)."""
    folder, raw = eval_project
    raw["evaluate"]["metrics"] = ["trust_hooks:fine"]
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    ok = subprocess.run([sys.executable, "-m", "pipeline.eval"], cwd=folder, env=clean_env(), capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    before = (folder / "metrics.json").read_bytes()

    raw["evaluate"]["metrics"] = ["trust_hooks:exits"]
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-m", "pipeline.eval"], cwd=folder, env=clean_env(), capture_output=True, text=True)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "called sys.exit(0)" in out.stdout + out.stderr and "Traceback" not in out.stdout + out.stderr
    assert (folder / "metrics.json").read_bytes() == before


def test_sys_exit_anywhere_in_a_stage_is_a_failure_not_a_finish():
    """The guard around every stage command: library code ending the process with exit code 0 is not a finished stage."""
    import typer
    from typer.testing import CliRunner

    from pipeline.console import stage_command

    @stage_command()
    def leaves_early():
        sys.exit(0)

    app = typer.Typer()
    app.command()(leaves_early)
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 2 and "stopped by sys.exit(0) in code it ran" in result.output


# ------------------------------------------------------------------------------------- too long for the context


def test_hellaswag_endings_longer_than_the_context_are_counted_in_the_notes(eval_project):
    """The built-in scorer scores the tail of an ending that does not fit (lm-eval refuses it): said, not silent."""
    folder, raw = eval_project
    model_dir = save_model_dir(folder / "short", tiny_gpt2(char_tokenizer(), n_positions=8), char_tokenizer())
    items = [{"ctx": "the cat", "endings": ["sat on the mat.", "a"], "label": 0}, {"ctx": "the", "endings": ["cat", "dog"], "label": 1}]
    (folder / "hs.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    raw["train"]["export_dir"] = str(model_dir)
    raw["evaluate"]["hellaswag"] = str(folder / "hs.jsonl")
    m = evaluate_model(params.validate_params(raw))
    assert m["hellaswag"]["endings_cut"] == 1
    assert any("1 item(s) have an ending longer than the model's context of 8 tokens (items 1)" in n for n in m["notes"])

    raw["train"]["export_dir"] = str(folder / "model")  # a context of 32: everything fits, nothing said
    m = evaluate_model(params.validate_params(raw))
    assert "endings_cut" not in m["hellaswag"] and not any("longer than the model's context" in n for n in m["notes"])


LONG_TASK = """\
task: long_answers
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{q}}}}"
doc_to_target: 0
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture
def lm_eval_project(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is part of the dev extra: make setup installs it")
    from pipeline.tokenize.tokenizers import BpeTokenizer

    tok = BpeTokenizer.train([SENTENCE * 20], vocab_size=300, min_frequency=1)
    model_dir = save_model_dir(tmp_path / "model", tiny_gpt2(tok, n_positions=16), tok)
    tokens_dir = write_tokens_dir(tmp_path / "tokens", tok, [SENTENCE] * 4)
    rows = [{"q": "the cat", "choices": [SENTENCE * 4, "sat"]}]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "long_answers.yaml").write_text(LONG_TASK.format(path=tmp_path / "long.jsonl"))
    raw = {"tokenize": {"kind": "bpe", "out_dir": str(tokens_dir)}, "model": {"block_size": 16}, "train": {"export_dir": str(model_dir)},
           "evaluate": {"metrics_file": str(tmp_path / "metrics.json"),
                        "lm_eval": {"tasks": ["long_answers"], "include_path": str(tmp_path / "tasks")}}}
    return tmp_path, raw


def test_an_lm_eval_continuation_longer_than_the_context_names_the_cause(lm_eval_project):
    """lm-eval's bare `AssertionError:` becomes which continuation, its length and the model's context."""
    _, raw = lm_eval_project
    with pytest.raises(UserError, match=r"task 'long_answers': a continuation ' the cat sat on the mat\..* is \d+ tokens, longer than"
                                        r" the model's context of 16; lm-eval cannot score"):
        evaluate_model(params.validate_params(raw))


def test_a_malformed_task_yaml_is_named_not_called_a_missing_task(lm_eval_project):
    folder, raw = lm_eval_project
    (folder / "tasks" / "long_answers.yaml").write_text("task: long_answers\ndoc_to_text: [unclosed\n")
    with pytest.raises(UserError, match=r"no task named 'long_answers', and .*long_answers.yaml is not valid YAML \(.*line 2"):
        evaluate_model(params.validate_params(raw))
