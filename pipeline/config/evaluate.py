"""evaluate's params: val metrics, HellaSwag, lm-evaluation-harness tasks and your own metrics of a model."""

from __future__ import annotations

import re

from pydantic import Field, model_validator

from pipeline.config.base import BIG, Section, check



class LmEvalTask(Section):
    """One lm-evaluation-harness task."""

    name: str = Field(..., min_length=1, description="an lm-eval task or group (arc_easy, hellaswag, ...) or one defined in include_path")
    num_fewshot: int | None = Field(None, ge=0, le=1 << 10, description="examples in the prompt; null = the task's own default")
    limit: int | None = Field(None, ge=1, le=BIG, description="score only the first N documents; null = all")


class LmEvalConfig(Section):
    """evaluate.lm_eval: any lm-evaluation-harness task, run on the model evaluate reads (pip install 'gptpipe[lm-eval]')."""

    tasks: list[LmEvalTask] = Field(default_factory=list, description="tasks to run (a name, or {name, num_fewshot, limit}); empty = none")
    batch_size: int | None = Field(None, ge=1, le=1 << 16, description="requests per forward pass; null = evaluate.batch_size")
    include_path: str | None = Field(None, description="a folder of your own task YAMLs (a local JSON dataset each: dataset_path: json)")
    online: bool = Field(
        False, description="let tasks download their datasets from the Hugging Face Hub (cached in HF_HOME); false = offline, one message when a task needs the network")

    @model_validator(mode="before")
    @classmethod
    def _names_alone(cls, data):
        """A task given as its bare name: `tasks: [arc_easy]`."""
        if isinstance(data, dict) and isinstance(data.get("tasks"), list):
            data = {**data, "tasks": [{"name": t} if isinstance(t, str) else t for t in data["tasks"]]}
        return data


class EvaluateConfig(Section):
    """evaluate: val loss, perplexity, bits per byte, accuracy and (optionally) HellaSwag of the exported model."""

    model_dir: str | None = Field(None, description="the model to evaluate (an export, a checkpoint, any HF folder or hub id); null = train.export_dir")
    batch_size: int = Field(8, ge=1, le=1 << 16, description="sequences per forward pass")
    block_size: int | None = Field(None, ge=8, le=1 << 20, description="window length for val loss; null = model.block_size")
    max_windows: int | None = Field(None, ge=1, le=1 << 40, description="score at most this many val windows; null = the whole val split")
    hellaswag: str | None = Field(None, description="HellaSwag JSONL (original or preprocessed format); null = skip it")
    hellaswag_url: str | None = Field(None, description="download the HellaSwag JSONL from here (once, into prepare.download_dir)")
    hellaswag_limit: int | None = Field(None, ge=1, le=BIG, description="score only the first N HellaSwag items")
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig, description="lm-evaluation-harness tasks (off with no tasks)")
    metrics: list[str] = Field(
        default_factory=list, description="your own metrics: module:function names imported from the project folder, each called with the model, tokenizer and val tokens (code you run: docs/stages/evaluate.md)")
    metrics_file: str = Field("reports/metrics.json", min_length=1, description="where the metrics go (declared as DVC metrics)")

    @model_validator(mode="after")
    def _one_hellaswag(self):
        if self.hellaswag and self.hellaswag_url:
            check([("hellaswag_url", "set together with evaluate.hellaswag: keep one of them")])
        bad = [m for m in self.metrics if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", m)]
        if bad:
            check([("metrics", f"{bad[0]!r} is not module:function (e.g. my_metrics:rhyme_rate, for my_metrics.py in the project folder)")])
        return self
