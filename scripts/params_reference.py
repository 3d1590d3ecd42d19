"""Write docs/params.md from the schemas: `python scripts/params_reference.py`."""

from pathlib import Path

from pipeline.tools.params_docs import reference_markdown

if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / "docs" / "params.md"
    target.write_text(reference_markdown(), encoding="utf-8")
    print(f"wrote {target}")
