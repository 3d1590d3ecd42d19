"""The report stage: training curves as PNGs and one page (Markdown and self-contained HTML) with metrics and samples.

DVC draws the same curves straight from DVCLive's files (dvc.yaml's plots); nothing here rewrites them.
"""

from __future__ import annotations

import base64
import html
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from pipeline.config.all import Params
from pipeline.files import write_text_atomic
from pipeline.layout import ReportDir, SamplesDir, TrainMetrics
from pipeline.machine import cpu_model
from pipeline.output import format_value

# (metric logged by training, file stem, y label); train/loss and val/loss share one figure.
CURVES = [
    ("train/lr", "lr", "learning rate"),
    ("train/tokens_per_s", "throughput", "tokens/s"),
    ("train/mfu", "mfu", "model FLOPs utilisation"),
    ("train/grad_norm", "grad_norm", "gradient norm (before clipping)"),
    ("hellaswag/acc_norm", "hellaswag", "HellaSwag acc_norm"),
]


def draw_pngs(history: dict, out_dir: Path, target: dict | None = None) -> list[Path]:
    """The same curves as PNG files (for the report, and for anyone without `dvc plots`); with train.target_loss
    (target: metrics.json's record), val loss against training seconds and model FLOPs with the target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = dict(history.get("tokens", []))
    drawn = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, path)
        drawn.append(path)

    for x_name in ("step", "tokens"):
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for split, style in (("train", "-"), ("val", "o-")):
            points = history.get(f"{split}/loss", [])
            xs = [s if x_name == "step" else tokens.get(s) for s, _ in points]
            ax.plot(xs, [v for _, v in points], style, label=f"{split} loss", markersize=4)
        ax.set_xlabel("step" if x_name == "step" else "tokens seen")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "loss" if x_name == "step" else "loss_vs_tokens")
    val = dict(history.get("val/loss", []))
    for along, stem, label in (("val/train_seconds", "val_loss_vs_seconds", "seconds in training steps"),
                               ("val/flops", "val_loss_vs_flops", "model FLOPs")):
        xs = dict(history.get(along, []))
        steps = [s for s in val if s in xs]
        if not steps:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        ax.plot([xs[s] for s in steps], [val[s] for s in steps], "o-", markersize=4, label="val loss")
        if target:
            ax.axhline(target["loss"], color="tab:red", linestyle="--", linewidth=1, label=f"target {target['loss']}")
            if target.get("reached"):
                ax.plot([target["train_seconds" if along == "val/train_seconds" else "flops"]], [target["val_loss"]], "*",
                        color="tab:red", markersize=12, label=f"reached at step {target['step']:,}")
        ax.set_xlabel(label)
        ax.set_ylabel("val loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, stem)
    for metric, stem, label in CURVES:
        points = history.get(metric, [])
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.0))
        ax.plot([s for s, _ in points], [v for _, v in points])
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        save(fig, stem)
    return drawn


def hardware() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_model(), "cpu cores": os.cpu_count()}
    try:
        info["deepspeed"] = version("deepspeed")  # not imported: it would probe accelerators just to say its version
    except PackageNotFoundError:
        pass
    if torch.cuda.is_available():
        info["gpus"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return info


def metric_rows(metrics: dict, train_summary: dict) -> list[tuple[str, str]]:
    rows = []
    for group in ("val", "hellaswag"):
        for key, value in (metrics.get(group) or {}).items():
            rows.append((f"{group} {key}", format_value(value)))
    for task, values in (metrics.get("lm_eval") or {}).items():  # lm-evaluation-harness tasks
        rows += [(f"{task} {key}", format_value(value)) for key, value in values.items() if "stderr" not in key]
    for name, values in metrics.items():  # evaluate.metrics: your own, beside metrics.json's own sections
        if name not in ("val", "hellaswag", "lm_eval", "model", "notes") and isinstance(values, dict):
            rows += [(f"{name} {key}", format_value(value)) for key, value in values.items()]
    for key in ("train/loss", "train/tokens_per_s", "train/ms_per_step", "train/mfu", "hellaswag/acc_norm"):
        value = _dig(train_summary, key.split("/"))
        if value is not None:
            rows.append((key.replace("/", " "), format_value(value)))
    if "step" in train_summary:
        rows.append(("train steps", format_value(train_summary["step"])))
    if train_summary.get("stopped"):
        rows.append(("train stopped", str(train_summary["stopped"])))
    target = train_summary.get("target")
    if isinstance(target, dict):
        if target.get("reached"):
            rows.append((f"val loss {target['loss']} reached at step", format_value(target["step"])))
            for key, label in (("train_seconds", "seconds in training"), ("stage_seconds", "seconds since the stage started"),
                               ("tokens", "tokens"), ("flops", "model FLOPs")):
                rows.append((f"  ... {label}", format_value(target[key])))
        else:
            rows.append((f"val loss {target['loss']}", "not reached"))
    for phase, seconds in (train_summary.get("time") or {}).items():
        rows.append((f"train seconds {phase}", format_value(float(seconds))))
    return rows


def _dig(d: dict, keys: list[str]):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def build_report(p: Params) -> Path:
    """PNGs and report.md / report.html in report.out_dir from what the earlier stages left; the HTML's path."""
    out = ReportDir(p.report.out_dir)
    out.plots.mkdir(parents=True, exist_ok=True)
    history = TrainMetrics(p.train.metrics_dir).read_curves()
    metrics = _read_json(Path(p.evaluate.metrics_file))
    train_summary = _read_json(TrainMetrics(p.train.metrics_dir).summary)
    pngs = draw_pngs(history, out.plots, train_summary.get("target"))
    samples = _read_jsonl(SamplesDir(p.sample.out_dir).jsonl)
    during = _read_jsonl(TrainMetrics(p.train.metrics_dir).samples)  # generated along the way, by step
    rows = metric_rows(metrics, train_summary)
    config_yaml = yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False)
    hw = hardware()

    md = ["# gptpipe report", "", "## Metrics", "", "| metric | value |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in rows]
    md += [f"\n_{note}_" for note in metrics.get("notes", [])]
    md += ["", "## Training curves", ""] + [f"![{png.stem}](plots/{png.name})" for png in pngs]
    if during:
        md += ["", "## Samples during training", ""]
        for s in during:
            md += [f"**step {s['step']}**, prompt `{s['prompt']!r}`", "", "```", s["prompt"] + s["text"], "```", ""]
    md += ["", "## Samples", ""]
    for s in samples:
        md += [f"**prompt** `{s['prompt']!r}` (sample {s.get('index', 0) + 1})", "", "```", s["text"], "```", ""]
    md += ["## Configuration", "", "```yaml", config_yaml.rstrip(), "```", "", "## Hardware", ""]
    md += [f"- {k}: {v}" for k, v in hw.items()]
    write_text_atomic(out.markdown, "\n".join(md) + "\n")

    write_text_atomic(out.html, _html(rows, metrics.get("notes", []), pngs, during, samples, config_yaml, hw))
    return out.html


def _html(rows, notes, pngs, during, samples, config_yaml, hw) -> str:
    """One self-contained page: images inlined, no scripts or fonts to fetch, so it reads offline."""
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>gptpipe report</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}",
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}",
        "td.v{text-align:right;font-variant-numeric:tabular-nums}.grid{display:flex;flex-wrap:wrap;gap:8px}",
        ".grid img{width:520px;border:1px solid #eee}pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}",
        "</style></head><body><h1>gptpipe report</h1><h2>Metrics</h2><table><tr><th>metric</th><th>value</th></tr>",
    ]
    parts += [f"<tr><td>{e(k)}</td><td class='v'>{e(v)}</td></tr>" for k, v in rows]
    parts += ["</table>"] + [f"<p><em>{e(n)}</em></p>" for n in notes]
    parts += ["<h2>Training curves</h2><div class='grid'>"]
    for png in pngs:
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(f"<img alt='{e(png.stem)}' src='data:image/png;base64,{data}'>")
    parts += ["</div>"]
    if during:
        parts += ["<h2>Samples during training</h2>"]
        for s in during:
            parts.append(f"<p><b>step {s['step']}</b>, prompt <code>{e(repr(s['prompt']))}</code></p><pre>{e(s['prompt'] + s['text'])}</pre>")
    parts += ["<h2>Samples</h2>"]
    for s in samples:
        parts.append(f"<p><b>prompt</b> <code>{e(repr(s['prompt']))}</code> (sample {s.get('index', 0) + 1})</p><pre>{e(s['text'])}</pre>")
    parts += [f"<h2>Configuration</h2><pre>{e(config_yaml)}</pre><h2>Hardware</h2><ul>"]
    parts += [f"<li>{e(k)}: {e(str(v))}</li>" for k, v in hw.items()]
    parts += ["</ul></body></html>"]
    return "\n".join(parts)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
