"""The rules that look at the disk (an output on an input, a model folder's own tokenizer) are checked where params.yaml
is read (params.py), after the schemas: the schemas validate alike on every machine, and one message, worded as
before, names every problem."""

import os
from pathlib import Path

import pytest

from pipeline import params
from pipeline.config.all import Params
from pipeline.errors import UserError

CLOBBER = {"prepare": {"out_dir": "data/raw", "source": {"kind": "files", "path": "data/raw/a.txt"}}}
CLOBBER_LINE = ("prepare.out_dir: data/raw holds prepare.source.path=data/raw/a.txt (an input), which replacing the folder"
                " would delete; choose another folder")
MISSING_MODEL_LINE = "model.init: './nowhere/model' not found (no such folder; a hub id has the form name or owner/name)"


class TouchedDisk(Exception):
    """Not a ValueError: pydantic would turn that into a validation error and hide where it came from."""


def test_the_schemas_never_look_at_the_disk(monkeypatch, tmp_path):
    (tmp_path / "model").mkdir()
    raw = {**CLOBBER, "model": {"init": str(tmp_path / "model")}, "tokenize": {"pretrained": str(tmp_path / "model")},
           "sample": {"prompts_file": "data/raw/prompts.txt"}}

    def touched(*args, **kwargs):
        raise TouchedDisk(args)

    with monkeypatch.context() as m:
        for name in ("exists", "isdir", "isfile", "realpath", "expanduser"):
            m.setattr(os.path, name, touched)
        for name in ("exists", "is_dir", "is_file", "resolve", "stat"):
            m.setattr(Path, name, touched)
        p = Params.model_validate(raw)  # the output on the input is refused by params.py, not here
    assert p.prepare.out_dir == "data/raw" and p.model.init == str(tmp_path / "model")


def test_the_disk_rules_refuse_at_the_boundary_with_the_same_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        params.validate_params(CLOBBER)
    assert str(e.value) == "params: 1 problem\n  - " + CLOBBER_LINE
    with pytest.raises(UserError) as e:
        params.validate_params({"model": {"init": "./nowhere/model"}}, source="params.yaml")
    assert str(e.value) == "params.yaml: 1 problem\n  - " + MISSING_MODEL_LINE
    assert params.disk_problems(Params()) == []


def test_every_disk_problem_comes_in_one_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        params.validate_params({**CLOBBER, "model": {"init": "./nowhere/model"}})
    assert str(e.value) == "params: 2 problems\n  - " + CLOBBER_LINE + "\n  - " + MISSING_MODEL_LINE


def test_a_schema_problem_is_reported_before_the_disk_is_looked_at(tmp_path, monkeypatch):
    """As before: a section that does not validate gives its own message (the disk rules need valid params)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        params.validate_params({**CLOBBER, "train": {"lr": -1}})
    assert "train.lr: got -1" in str(e.value) and "prepare.out_dir" not in str(e.value)
