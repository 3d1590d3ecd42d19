"""The whole params.yaml: every section in one Params, and the values read across sections (the model evaluate and
sample read, the window length evaluate scores, every path a stage writes).

Rules that look at the disk (inputs that exist, outputs that would clobber them, a model folder's own tokenizer) are
checked where the file is read, in params.py: a schema that touches the disk would change with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from pipeline.config.base import Section
from pipeline.config.evaluate import EvaluateConfig
from pipeline.config.model import ModelConfig
from pipeline.config.prepare import PrepareConfig
from pipeline.config.report import ReportConfig
from pipeline.config.sample import SampleConfig
from pipeline.config.tokenize import TokenizeConfig
from pipeline.config.train import TrainConfig
from pipeline.layout import ReportDir, SamplesDir



@dataclass(frozen=True)
class ModelRef:
    """The model a stage reads, and the params key that chose it (for error messages)."""

    path: str
    key: str


class Params(Section):
    """The whole params.yaml. Every section has defaults, so a file may set only what it changes."""

    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    def model_for(self, stage: Literal["evaluate", "sample"]) -> ModelRef:
        """The model evaluate or sample reads: its own model_dir, else what train exports."""
        own = getattr(self, stage).model_dir
        return ModelRef(own, f"{stage}.model_dir") if own else ModelRef(self.train.export_dir, "train.export_dir")

    @property
    def eval_block_size(self) -> int:
        """Window length of the evaluate stage's val loss."""
        return self.evaluate.block_size or self.model.block_size

    def output_paths(self) -> dict[str, str]:
        """Every path a stage writes, by the key that sets it (sample and report write named files into their folder)."""
        samples, report = SamplesDir(self.sample.out_dir), ReportDir(self.report.out_dir)
        return {
            "prepare.out_dir": self.prepare.out_dir, "prepare.download_dir": self.prepare.download_dir,
            "tokenize.out_dir": self.tokenize.out_dir, "tokenize.metrics_file": self.tokenize.metrics_file,
            "train.out_dir": self.train.out_dir, "train.export_dir": self.train.export_dir, "train.metrics_dir": self.train.metrics_dir,
            "evaluate.metrics_file": self.evaluate.metrics_file,
            "sample.out_dir (samples.jsonl)": str(samples.jsonl), "sample.out_dir (samples.md)": str(samples.markdown),
            "report.out_dir (report.md)": str(report.markdown), "report.out_dir (report.html)": str(report.html),
            "report.out_dir (plots)": str(report.plots),
        }  # fmt: skip


SECTIONS = tuple(Params.model_fields)
