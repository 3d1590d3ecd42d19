"""A clean `dvc repro` of the pipeline prints no DVC warning (each one teaches users to skim past the next)."""

import pytest
from test_dvc import DVC, repo, sh  # noqa: F401 - repo is the fixture: a copy of the pipeline with small params


@pytest.mark.slow
def test_a_clean_repro_without_samples_during_training_warns_about_nothing(repo):  # noqa: F811
    """The tiny pipeline with train.sample_interval off, so training's samples file stays empty: DVC warns about an
    empty file output, so the samples live in a folder output, which it does not warn about."""
    import yaml

    assert yaml.safe_load((repo / "params.yaml").read_text())["train"].get("sample_interval") is None
    out = sh(DVC, "repro", cwd=repo)
    assert "Running stage 'report'" in out
    warnings = [line for line in out.splitlines() if line.lstrip().startswith("WARNING")]
    assert not warnings, "\n".join(warnings)
    assert (repo / "reports" / "train" / "samples" / "samples.jsonl").read_text() == ""
