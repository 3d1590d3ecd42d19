"""report's params: where the page of curves, metrics and samples goes."""

from __future__ import annotations

from pydantic import Field

from pipeline.config.base import Section



class ReportConfig(Section):
    """report: training curves, metrics and samples in one page that reads offline."""

    out_dir: str = Field("reports", min_length=1, description="where report.md, report.html and plots/*.png go")
