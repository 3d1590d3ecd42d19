"""The report stage: PNGs from DVCLive's files, and a self-contained report."""

import json

from dvclive import Live

from pipeline import params
from pipeline.layout import TrainMetrics
from pipeline.report.stage import build_report


def fake_training_log(metrics_dir, steps=20):
    """What the training loop logs, written through DVCLive itself."""
    live = Live(dir=str(metrics_dir), report=None, save_dvc_exp=False, dvcyaml=False)
    for step in range(1, steps + 1):
        live.step = step
        live.log_metric("train/loss", 5.0 - step * 0.1)
        live.log_metric("train/lr", 1e-3)
        live.log_metric("train/tokens_per_s", 1000.0 + step)
        live.log_metric("train/mfu", 0.1)
        live.log_metric("train/grad_norm", 1.0)
        live.log_metric("tokens", step * 512)
        if step % 5 == 0:
            live.log_metric("val/loss", 5.2 - step * 0.1)
    live.make_summary()
    live.end()


def test_report_has_metrics_plots_samples_config_and_hardware(tmp_path):
    p = params.validate_params(
        {
            "train": {"metrics_dir": str(tmp_path / "train")},
            "evaluate": {"metrics_file": str(tmp_path / "metrics.json")},
            "sample": {"out_dir": str(tmp_path)},
            "report": {"out_dir": str(tmp_path)},
        }
    )
    fake_training_log(tmp_path / "train")
    (tmp_path / "metrics.json").write_text(json.dumps({"val": {"loss": 3.25, "perplexity": 25.8}, "notes": ["HellaSwag skipped"]}))
    (tmp_path / "samples.jsonl").write_text(json.dumps({"prompt": "Once", "index": 0, "text": "Once upon a <time>"}) + "\n")

    assert [s for s, _ in TrainMetrics(tmp_path / "train").read_curves()["val/loss"]] == [5, 10, 15, 20]
    assert build_report(p) == tmp_path / "report.html"

    plots = tmp_path / "plots"
    for name in ("loss", "loss_vs_tokens", "lr", "throughput", "mfu", "grad_norm"):
        png = plots / f"{name}.png"
        assert png.stat().st_size > 5000, name  # an axis with a drawn line, not an empty canvas
    assert not list(plots.glob("*.csv"))  # dvc.yaml plots DVCLive's own files: no second copy of the curves

    md = (tmp_path / "report.md").read_text()
    assert "| val loss | 3.25 |" in md and "![loss](plots/loss.png)" in md and "Once upon a <time>" in md
    assert "HellaSwag skipped" in md and "## Hardware" in md and "zero_stage: 0" in md
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6  # readable offline: nothing to fetch
    assert "Once upon a &lt;time&gt;" in page and "<script" not in page


def test_the_curve_files_training_writes_are_dvclives_byte_for_byte(tmp_path):
    """gptpipe writes DVCLive's files itself (the package's imports cost a training process about half a second):
    the same logs through real DVCLive and through CurveFiles give the same files, resume included."""
    from pipeline.layout import TrainMetrics
    from pipeline.train.metrics_log import CurveFiles

    steps = [(1, {"train/loss": 4.25, "train/lr": 1e-3, "tokens": 128}), (2, {"train/loss": float("nan"), "tokens": 256}),
             (4, {"val/loss": 3.5, "val/perplexity": 33.11545195869231, "tokens": 512})]
    for resume, rows in ((False, steps[:2]), (True, steps[2:])):
        live = Live(dir=str(tmp_path / "dvclive"), resume=resume, report=None, save_dvc_exp=False, dvcyaml=False)
        ours = CurveFiles(TrainMetrics(tmp_path / "ours"), resume)
        for step, values in rows:
            live.step = ours.step = step
            for name, value in values.items():
                live.log_metric(name, value)
                ours.log(name, value)
        live.summary.update({"time": {"total": 1.5}})
        ours.summary.update({"time": {"total": 1.5}})
        live.make_summary()
        live.end()
        ours.write_summary()
        theirs = {str(p.relative_to(tmp_path / "dvclive")): p.read_bytes() for p in (tmp_path / "dvclive").rglob("*") if p.is_file()}
        mine = {str(p.relative_to(tmp_path / "ours")): p.read_bytes() for p in (tmp_path / "ours").rglob("*") if p.is_file()}
        assert mine == theirs
