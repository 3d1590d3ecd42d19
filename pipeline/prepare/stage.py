"""The prepare stage: sources -> normalised documents split into train and val (train.jsonl and val.jsonl, or only
plan.bin with store: index) and manifest.json."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from pathlib import Path
from typing import Callable

from pipeline.config.prepare import PrepareConfig
from pipeline.files import building_dir, write_json_atomic
from pipeline.layout import SPLITS, PreparedDir
from pipeline.output import ProgressFactory, no_progress
from pipeline.prepare.documents import text_bytes
from pipeline.prepare.formats import SourceStats
from pipeline.prepare.plan import CUT, JSON_LINE, SHORT, TRAIN, VAL, Plan, bincount, make_plan, read_codes, replay


def prepare_corpus(cfg: PrepareConfig, progress: Callable[[int], None] | None = None,
                   download_progress: ProgressFactory = no_progress) -> dict:
    """The prepare stage: out_dir/manifest.json and, by prepare.store, train.jsonl + val.jsonl (text) or plan.bin
    (index); replaced whole or not at all.

    One pass over the source decides each document's fate (dropped, train or val) into files, not memory; store:
    text also writes every document it may keep to a scratch file, whose lines then go to train.jsonl or
    val.jsonl by those decisions. progress(n) is called as n more input bytes are read (source_size gives the
    total). Returns the manifest.
    """
    with building_dir(cfg.out_dir, "prepare.out_dir") as tmp:
        out, work = PreparedDir(tmp), tmp / ".work"
        work.mkdir()
        stats = SourceStats(progress=progress)
        plan = make_plan(cfg, out.plan, work, stats, download_progress)  # raises unless some document is kept
        plan.codes.flush()
        documents, nbytes = _count(cfg, plan)
        if cfg.store == "text":
            _write_text(out, work / "candidates.jsonl", plan)
            out.plan.unlink()
        shutil.rmtree(work)
        combined = json.dumps([[r["role"], r["sha256"]] for r in stats.inputs]).encode()
        manifest = {"documents": documents, "bytes": nbytes, "dropped": plan.dropped, "replaced": stats.replaced,
                    "moved": plan.moved, "inputs": stats.inputs, "input_hash": hashlib.sha256(combined).hexdigest(),
                    "params": cfg.model_dump(mode="json", exclude={"out_dir", "download_dir"})}
        if cfg.store == "index":  # what tokenize needs to read the source again
            manifest["plan"] = {"documents": len(plan.codes), "cut": plan.cut, "download_dir": cfg.download_dir}
        write_json_atomic(out.manifest, manifest)
        stats.advance(0, flush=True)
    return manifest


def _write_text(out: PreparedDir, candidates: Path, plan: Plan) -> None:
    """store: text: the scratch file's lines (one per document not too short, in source order) into train.jsonl and
    val.jsonl by the plan's codes; copied as bytes, only the cut document of split: tail is decoded."""
    lines = open(candidates, "rb")
    with lines, open(out.split("train"), "wb") as train, open(out.split("val"), "wb") as val:
        for code in read_codes(out.plan):
            if code == SHORT:
                continue  # it has no line
            line = next(lines)
            if code == TRAIN:
                train.write(line)
            elif code == VAL:
                val.write(line)
            elif code == CUT:
                text = json.loads(line)["text"]
                train.write((JSON_LINE.encode({"text": text[: plan.cut[1]]}) + "\n").encode("utf-8"))
                val.write((JSON_LINE.encode({"text": text[plan.cut[1]:]}) + "\n").encode("utf-8"))


def _count(cfg: PrepareConfig, plan: Plan) -> tuple[dict, dict]:
    """Documents and bytes per split from the plan; the cut document of split: tail is read again."""
    documents = {split: int(n) for split, n in zip(SPLITS, bincount(plan.codes)[[TRAIN, VAL]])}
    nbytes = {split: int(n) for split, n in zip(SPLITS, bincount(plan.codes, weights=plan.sizes)[[TRAIN, VAL]])}
    if plan.cut:
        codes = itertools.chain(itertools.repeat(SHORT, plan.cut[0]), [CUT])  # skip to it, read it
        halves = replay(cfg, codes, plan.cut, cfg.download_dir, SourceStats(), "prepare.source", [])
        for split, text in itertools.islice(halves, 2):  # its two halves; the rest of the source is not read
            documents[split] += 1
            nbytes[split] += text_bytes(text)
        halves.close()
    return documents, nbytes
