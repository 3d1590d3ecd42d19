"""The file names inside every output folder, declared once: each folder is a small paths object.

    PreparedDir   prepare.out_dir     train.jsonl, val.jsonl (store: text) or plan.bin (store: index), manifest.json
    TokensDir     tokenize.out_dir    train-00000.bin ..., val-00000.bin ..., meta.json, tokenizer/
    RunDir        train.out_dir/run-* run.json, ds_config.json, latest, best, step-*/, universal/step-*/
    CheckpointDir run-*/step-*        DeepSpeed's files, rng-rank<r>.pt, config.json, tokenizer/, metrics/, state.json,
                                      checksums.json (last)
    ExportDir     train.export_dir    a Hugging Face folder plus gptpipe.json, gptpipe_tokenizer/ and
                                      gptpipe_checksums.json (last)
    TrainMetrics  train.metrics_dir   DVCLive's metrics.json (summary) and plots/metrics/**.tsv (curves),
                                      samples/samples.jsonl
    SamplesDir    sample.out_dir      samples.jsonl, samples.md
    ReportDir     report.out_dir      report.md, report.html, plots/*.png
"""

from __future__ import annotations

import csv
from pathlib import Path

SPLITS = ("train", "val")


class Folder:
    """A folder whose file names are known; build it from a path (a str from params, or a Path)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.root == self.root

    def __hash__(self) -> int:
        return hash((type(self), self.root))


class PreparedDir(Folder):
    def split(self, name: str) -> Path:
        assert name in SPLITS, name
        return self.root / f"{name}.jsonl"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def plan(self) -> Path:
        """prepare.store: index only: one byte per source document saying where it goes (prepare/plan.py's codes)."""
        return self.root / "plan.bin"


class TokensDir(Folder):
    def shard(self, split: str, index: int) -> Path:
        """A split's tokens are in shards of tokenize.shard_tokens ids: train-00000.bin, train-00001.bin, ..."""
        assert split in SPLITS, split
        return self.root / f"{split}-{index:05d}.bin"

    def shards(self, split: str) -> list[Path]:
        assert split in SPLITS, split
        return sorted(self.root.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].bin"))

    @property
    def progress(self) -> Path:
        """While tokenize runs: what it has finished, so an interrupted run resumes from its last whole shard."""
        return self.root / "progress.json"

    @property
    def meta(self) -> Path:
        return self.root / "meta.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"


class CheckpointDir(Folder):
    """One saved step: DeepSpeed's files plus what makes it stand alone (params, model config, tokenizer)."""

    @property
    def tag(self) -> str:
        return self.root.name

    @property
    def state(self) -> Path:
        """Where the run stands: step, tokens seen, best so far, the resolved params."""
        return self.root / "state.json"

    @property
    def checksums(self) -> Path:
        """sha256 of every other file; written last, so a folder without it is incomplete."""
        return self.root / "checksums.json"

    @property
    def model_config(self) -> Path:
        return self.root / "config.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def metrics(self) -> Path:
        """The training curves up to this step (a TrainMetrics folder): a resume restores them."""
        return self.root / "metrics"

    def rng(self, rank: int) -> Path:
        return self.root / f"rng-rank{rank}.pt"


class RunDir(Folder):
    """One training run: every checkpoint of it, and what identifies it."""

    @property
    def identity(self) -> Path:
        return self.root / "run.json"

    @property
    def ds_config(self) -> Path:
        return self.root / "ds_config.json"

    @property
    def latest(self) -> Path:
        return self.root / "latest"

    @property
    def best(self) -> Path:
        return self.root / "best"

    def step(self, tag: str) -> CheckpointDir:
        return CheckpointDir(self.root / tag)

    def steps(self) -> list[CheckpointDir]:
        """Every step folder, complete or not, oldest first."""
        return [CheckpointDir(d) for d in sorted(self.root.glob("step-*")) if d.is_dir()]

    def universal(self, tag: str) -> Path:
        """A step converted to DeepSpeed's universal format, for a resume on another number of processes."""
        return self.root / "universal" / tag


def step_tag(step: int) -> str:
    return f"step-{step:06d}"


class ExportDir(Folder):
    @property
    def model_config(self) -> Path:
        return self.root / "config.json"

    @property
    def checksums(self) -> Path:
        """sha256 of every other file, as a step folder's checksums.json (checkpoints/folder.py seals both); written
        last. Named apart from a step folder's, which tells a step folder from an export."""
        return self.root / "gptpipe_checksums.json"

    @property
    def info(self) -> Path:
        """Where the weights came from: step, tokens seen, val loss, params."""
        return self.root / "gptpipe.json"

    @property
    def tokenizer(self) -> Path:
        """gptpipe's own tokenizer folder (decodes every kind, char and tiktoken too)."""
        return self.root / "gptpipe_tokenizer"


def saved_tokenizer(folder: str | Path) -> Path | None:
    """The gptpipe tokenizer folder inside a model folder gptpipe wrote: a step folder's, a run folder's newest
    step's, an export's; None for any other folder (a Hugging Face one) or a hub id."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if RunDir(folder).latest.is_file():
        folder = RunDir(folder).step(RunDir(folder).latest.read_text().strip()).root
    for candidate in (CheckpointDir(folder).tokenizer, ExportDir(folder).tokenizer):
        if (candidate / "tokenizer_meta.json").is_file():  # tokenizers.META_FILE
            return candidate
    return None


class TrainMetrics(Folder):
    """DVCLive's folder: its names are DVCLive's, declared here so dvc.yaml's plots and the report agree."""

    @property
    def summary(self) -> Path:
        return self.root / "metrics.json"

    @property
    def curves(self) -> Path:
        """One TSV per metric (step, value), e.g. train/loss.tsv."""
        return self.root / "plots" / "metrics"

    def read_curves(self) -> dict[str, list[tuple[int, float]]]:
        """Every curve DVCLive logged: name (e.g. "val/loss") -> [(step, value)] in the file's order. The one reader
        of these files: for the report, a restored W&B history and plan's probe."""
        curves = {}
        for tsv in sorted(self.curves.rglob("*.tsv")):
            name = tsv.relative_to(self.curves).with_suffix("").as_posix()
            column = name.rpartition("/")[2]  # DVCLive names the value column after the file
            with open(tsv, encoding="utf-8", newline="") as f:
                rows = csv.DictReader(f, delimiter="\t")
                curves[name] = [(int(r["step"]), float(r[column])) for r in rows if r.get(column) not in (None, "")]
        return curves

    @property
    def samples(self) -> Path:
        """Text generated during training: one {"step", "prompt", "text"} per line. In a folder of its own, which
        dvc.yaml declares: DVC warns about an empty file output (a run without samples), never about a folder's file."""
        return self.root / "samples" / "samples.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"


class SamplesDir(Folder):
    @property
    def jsonl(self) -> Path:
        return self.root / "samples.jsonl"

    @property
    def markdown(self) -> Path:
        return self.root / "samples.md"


class ReportDir(Folder):
    @property
    def markdown(self) -> Path:
        return self.root / "report.md"

    @property
    def html(self) -> Path:
        return self.root / "report.html"

    @property
    def plots(self) -> Path:
        return self.root / "plots"
