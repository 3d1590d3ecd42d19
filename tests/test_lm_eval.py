"""evaluate.lm_eval: real lm-evaluation-harness tasks on a tiny real model, offline, with a task defined locally; and
the built-in HellaSwag scorer against lm-eval's own scoring of the shared sample, item for item (issue 21)."""

import json
import sys

import pytest
import torch
from test_evaluation import char_tokenizer, save_model_dir, tiny_gpt2, write_tokens_dir

from pipeline import params
from pipeline.config.evaluate import LmEvalConfig
from pipeline.errors import UserError
from pipeline.eval.harness import task_manager, transformers_tokenizer
from pipeline.eval.hellaswag import choice_logliks, parse_hellaswag
from pipeline.eval.stage import evaluate_model
from pipeline.tokenize.tokenizers import BpeTokenizer

pytest.importorskip("lm_eval", reason="lm-eval is part of the dev extra: make setup installs it")  # CI has it

# The shared sample is HellaSwag already preprocessed as lm-eval's process_docs does (its README): the same task as
# lm-eval's hellaswag.yaml with that step done, reading a local JSON file.
HELLASWAG_TASK = """\
task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{ctx}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{endings}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory, shared_data):
    text = (shared_data / "tinyshakespeare.txt").read_text()[:100_000]
    tok = BpeTokenizer.train([text[i : i + 2000] for i in range(0, len(text), 2000)], 512, 2)
    torch.manual_seed(0)
    model = tiny_gpt2(tok, n_positions=512, n_layer=2, vocab=576)
    folder = tmp_path_factory.mktemp("lm-eval")
    save_model_dir(folder / "model", model, tok)
    write_tokens_dir(folder / "tokens", tok, [text[:3000], text[3000:6000]])
    tasks = folder / "tasks"
    tasks.mkdir()
    (tasks / "hellaswag_local.yaml").write_text(HELLASWAG_TASK.format(path=shared_data / "hellaswag_val_sample.jsonl"))
    return folder, model.eval(), tok


def raw_params(folder, **lm_eval):
    return {"tokenize": {"kind": "bpe", "out_dir": str(folder / "tokens")}, "model": {"block_size": 64},
            "train": {"export_dir": str(folder / "model")},
            "evaluate": {"batch_size": 8, "metrics_file": str(folder / "metrics.json"), "lm_eval": lm_eval}}


def test_a_local_task_runs_offline_into_metrics_json(bpe_model):
    folder, _, _ = bpe_model
    raw = raw_params(folder, tasks=[{"name": "hellaswag_local", "limit": 12}], include_path=str(folder / "tasks"))
    m = evaluate_model(params.validate_params(raw))
    scores = m["lm_eval"]["hellaswag_local"]
    assert scores["n"] == 12 and 0 <= scores["acc"] <= 1 and 0 <= scores["acc_norm"] <= 1 and "acc_stderr" in scores
    assert json.loads((folder / "metrics.json").read_text())["lm_eval"] == m["lm_eval"]


def test_built_in_hellaswag_equals_lm_eval_item_for_item(bpe_model, shared_data):
    """The in-loop scorer gives lm-eval's choice on every item of the shared sample, log-likelihoods within 1e-4."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    folder, model, tok = bpe_model
    cfg = LmEvalConfig(tasks=["hellaswag_local"], include_path=str(folder / "tasks"))
    lm = HFLM(pretrained=model, tokenizer=transformers_tokenizer(tok), batch_size=8, device="cpu")
    out = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag_local"], task_manager=task_manager(cfg), log_samples=True)
    samples = sorted(out["samples"]["hellaswag_local"], key=lambda s: s["doc_id"])
    items = parse_hellaswag(shared_data / "hellaswag_val_sample.jsonl")
    ours = choice_logliks(model, tok, items, batch_size=8)
    assert len(samples) == len(items) == 100
    for sample, lls in zip(samples, ours):
        theirs = [float(r[0][0]) for r in sample["resps"]]
        assert lls == pytest.approx(theirs, abs=1e-4)
    ours_acc = sum(int(max(range(4), key=lambda j: lls[j]) == item.label) for item, lls in zip(items, ours)) / 100
    assert ours_acc == out["results"]["hellaswag_local"]["acc,none"]


def test_a_hub_task_offline_an_unknown_task_and_a_char_model_are_one_message_each(bpe_model, tmp_path):
    folder, _, _ = bpe_model
    with pytest.raises(UserError, match=r"task 'arc_easy' reads its data from the Hugging Face Hub, and evaluate runs offline"):
        evaluate_model(params.validate_params(raw_params(folder, tasks=[{"name": "arc_easy", "limit": 2}])))
    with pytest.raises(UserError, match=r"lm-eval has no task named 'arc_easyy' \(did you mean arc_easy"):
        evaluate_model(params.validate_params(raw_params(folder, tasks=["arc_easyy"])))

    tok = char_tokenizer()
    save_model_dir(tmp_path / "model", tiny_gpt2(tok), tok)
    write_tokens_dir(tmp_path / "tokens", tok, ["the cat sat"] * 4)
    raw = raw_params(tmp_path, tasks=["hellaswag_local"], include_path=str(folder / "tasks"))
    raw["tokenize"]["kind"] = "char"
    with pytest.raises(UserError, match=r"lm-eval needs a transformers tokenizer, and the model's is of kind char"):
        evaluate_model(params.validate_params(raw))


def test_without_the_package_it_says_how_to_install_it(bpe_model, monkeypatch):
    folder, _, _ = bpe_model
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets where the package is not installed
    with pytest.raises(UserError, match=r"the lm-evaluation-harness package is not installed .*pip install 'gptpipe\[lm-eval\]'"):
        evaluate_model(params.validate_params(raw_params(folder, tasks=["hellaswag_local"], include_path=str(folder / "tasks"))))
