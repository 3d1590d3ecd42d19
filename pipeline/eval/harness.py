"""Any lm-evaluation-harness task on the evaluated model, through the lm-eval package (an optional extra:
pip install 'gptpipe[lm-eval]'). The model is the one evaluate already loaded, in its precision; lm-eval gets it and
a transformers tokenizer with the same ids. Offline by default: a task whose data is on the Hugging Face Hub is one
message, and a task of your own reads a local JSON file (evaluate.lm_eval.include_path)."""

from __future__ import annotations

import difflib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config.evaluate import LmEvalConfig
from pipeline.errors import UserError
from pipeline.tokenize.tokenizers import Tokenizer

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

KEY = "evaluate.lm_eval"


def lm_eval_scores(cfg: LmEvalConfig, model, tokenizer: Tokenizer, batch_size: int, echo=print) -> dict:
    """{task: {metric: value, ..., "n": documents scored}} for each of cfg.tasks (a group: one entry per subtask)."""
    if not cfg.online:
        # Read by the datasets and huggingface_hub libraries when lm-eval imports them: set before that.
        os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise UserError(f"{KEY}: the lm-evaluation-harness package is not installed ({e}): pip install 'gptpipe[lm-eval]'") from None

    manager = task_manager(cfg)
    lm = HFLM(pretrained=model, tokenizer=transformers_tokenizer(tokenizer), batch_size=batch_size,
              device=str(next(model.parameters()).device))
    scores = {}
    for task in cfg.tasks:
        echo(f"evaluate: lm-eval {task.name}" + (f", {task.num_fewshot}-shot" if task.num_fewshot is not None else "")
             + (f", first {task.limit} documents" if task.limit else ""))
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=[task.name], num_fewshot=task.num_fewshot, limit=task.limit,
                                          task_manager=manager, log_samples=False)
        except Exception as e:  # noqa: BLE001 - any failure of a task (its data, its YAML) is one message naming it
            raise task_error(task.name, e, cfg.online) from None
        for name, values in out["results"].items():
            scores[name] = {**metric_values(values), "n": out.get("n-samples", {}).get(name, {}).get("effective")}
    return scores


def task_manager(cfg: LmEvalConfig) -> TaskManager:
    """lm-eval's task index. Its built-in tasks take seconds to index: with an include_path that defines every task
    asked for, only that folder is read."""
    from lm_eval.tasks import TaskManager

    if cfg.include_path and not os.path.isdir(cfg.include_path):
        raise UserError(f"{KEY}.include_path: {cfg.include_path} is not a folder (of task YAML files)")
    wanted = [t.name for t in cfg.tasks]
    if cfg.include_path:
        own = TaskManager(include_path=cfg.include_path, include_defaults=False)
        if not unknown_tasks(own, wanted):
            return own
    manager = TaskManager(include_path=cfg.include_path)
    missing = unknown_tasks(manager, wanted)
    broken = unreadable_yaml(cfg.include_path) if missing and cfg.include_path else None
    if broken:
        raise UserError(f"{KEY}.tasks: lm-eval has no task named {missing[0]!r}, and {broken}: lm-eval skips a task file it"
                        " cannot read without a word")
    if missing:
        close = difflib.get_close_matches(missing[0], manager.all_tasks, n=3)
        raise UserError(f"{KEY}.tasks: lm-eval has no task named {missing[0]!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                        + (f", and {cfg.include_path} does not define one" if cfg.include_path else "; your own go in a folder named by evaluate.lm_eval.include_path"))
    return manager


def unreadable_yaml(folder: str) -> str | None:
    """The first task YAML under folder that is not valid YAML, with where it breaks; None when every one reads.
    `!function` tags are read as text here: nothing is imported."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    for path in sorted(Path(folder).rglob("*.yaml")):
        try:
            yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 - a SafeLoader with one text tag
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            return f"{path} is not valid YAML ({' '.join(str(e).split())[:200]})"
    return None


def unknown_tasks(manager: TaskManager, names: list[str]) -> list[str]:
    known = set(manager.all_tasks) | set(manager.all_groups) | set(manager.all_tags)
    return [n for n in names if n not in known]


def transformers_tokenizer(tokenizer: Tokenizer):
    """A transformers tokenizer with the ids of gptpipe's: bpe and hf kinds have one (lm-eval needs it); char and
    tiktoken do not, which is one message."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="gptpipe-lm-eval-") as folder:
        if not tokenizer.save_for_transformers(folder):
            raise UserError(f"{KEY}: lm-eval needs a transformers tokenizer, and the model's is of kind {tokenizer.kind}, which has"
                            " none: use it with a model trained with tokenize.kind bpe or hf (HellaSwag, evaluate.hellaswag, scores any kind)")
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def metric_values(values: dict) -> dict:
    """lm-eval's 'acc,none': 0.25 as 'acc': 0.25 (a filter other than none kept: 'exact_match/strict-match')."""
    found = {}
    for key, value in values.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue  # alias, name, sample_len
        metric, filter_name = key.split(",", 1)
        found[metric if filter_name == "none" else f"{metric}/{filter_name}"] = value
    return found


def task_error(name: str, e: Exception, online: bool) -> UserError:
    too_long = continuation_too_long(e)
    if too_long:
        return UserError(f"{KEY}: task {name!r}: {too_long}; lm-eval cannot score a continuation that does not fit (use a model"
                         " with a longer context, or a task with shorter answers)")
    text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    network = isinstance(e, ConnectionError) or any(w in str(e).lower() for w in ("offline", "couldn't reach", "connection", "hub"))
    if network and not online:
        return UserError(f"{KEY}: task {name!r} reads its data from the Hugging Face Hub, and evaluate runs offline ({text}). Set"
                         " evaluate.lm_eval.online: true (downloads once into HF_HOME), or define the task in your own YAML with a"
                         " local dataset (dataset_path: json) in evaluate.lm_eval.include_path (docs/stages/evaluate.md)")
    return UserError(f"{KEY}: task {name!r} failed ({text})")


def continuation_too_long(e: Exception) -> str | None:
    """lm-eval's bare `assert len(continuation_enc) <= self.max_length` (lm_eval/models/huggingface.py), said in words:
    which continuation, how many tokens, and the model's context. None for any other failure."""
    if not isinstance(e, AssertionError):
        return None
    tb = e.__traceback__
    while tb is not None:
        f = tb.tb_frame.f_locals
        lm, chunk, cont = f.get("self"), f.get("chunk"), f.get("continuation_enc")
        max_length = getattr(lm, "max_length", None)
        if isinstance(cont, list) and isinstance(max_length, int) and len(cont) > max_length:
            text = next((key[1] for key, _, c in chunk or [] if c is cont and isinstance(key, tuple) and len(key) == 2), None)
            shown = f" {text[:60]!r}{'...' if len(text) > 60 else ''}" if isinstance(text, str) else ""
            return f"a continuation{shown} is {len(cont)} tokens, longer than the model's context of {max_length}"
        tb = tb.tb_next
    return None
