"""The params schema: shipped files validate, typos and bad values are named, -S strings are coerced."""

from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from pipeline import params
from pipeline.config.all import Params, SECTIONS
from pipeline.errors import UserError


def shipped_params_files() -> list[Path]:
    return [ROOT / "params.yaml", *sorted((ROOT / "recipes").glob("*.yaml"))]


@pytest.mark.parametrize("path", shipped_params_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_params_validate(path):
    params.load_params(path)


def test_empty_params_take_defaults():
    p = params.validate_params({})
    assert p.tokenize.kind == "bpe" and p.prepare.source.kind == "builtin"


def problems(raw: dict) -> str:
    with pytest.raises(UserError) as e:
        params.validate_params(raw)
    return str(e.value)


def test_typo_at_top_level_section_and_nested_depth():
    msg = problems({"tokenise": {}, "tokenize": {"vocab_sise": 10}, "prepare": {"source": {"kindd": "files"}}})
    assert "3 problems" in msg
    assert "tokenise: unknown key (did you mean 'tokenize'?)" in msg
    assert "tokenize.vocab_sise: unknown key (did you mean 'vocab_size'?)" in msg
    assert "prepare.source.kindd: unknown key (did you mean 'kind'?)" in msg


def test_bad_values_name_key_value_and_what_is_allowed():
    msg = problems({"tokenize": {"kind": "wordpiece", "vocab_size": 10}, "prepare": {"val_fraction": 2}})
    assert "tokenize.kind: got 'wordpiece'; input should be 'tiktoken', 'char', 'bpe', 'hf' or 'import'" in msg
    assert "tokenize.vocab_size: got 10; input should be greater than or equal to 260" in msg
    assert "prepare.val_fraction: got 2; input should be less than or equal to 0.5" in msg


def test_cross_field_problems_name_the_dotted_key():
    msg = problems({"tokenize": {"kind": "hf"}, "prepare": {"source": {"kind": "url", "url": "ftp://x"}}})
    assert "tokenize.pretrained: required when kind is 'hf'" in msg
    assert "prepare.source.url: got 'ftp://x'" in msg


def test_dvc_exp_run_strings_are_coerced():
    # `dvc exp run -S` writes values that YAML reads back as strings.
    raw = yaml.safe_load("tokenize:\n  vocab_size: '4096'\n  workers: 2\nprepare:\n  val_fraction: 1e-1\n  dedup: 'false'\n")
    assert raw["prepare"]["val_fraction"] == "1e-1"
    p = params.validate_params(raw)
    assert p.tokenize.vocab_size == 4096 and p.prepare.val_fraction == pytest.approx(0.1) and p.prepare.dedup is False


def test_overrides_apply_with_the_same_validation(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("tokenize:\n  vocab_size: 512\n")
    p = params.load_params(path, ["tokenize.vocab_size=1024", "prepare.source.kind=files", "prepare.source.path=a.txt"])
    assert p.tokenize.vocab_size == 1024 and p.prepare.source.path == "a.txt"
    with pytest.raises(UserError, match="tokenize.vocab_size: got 'many'"):
        params.load_params(path, ["tokenize.vocab_size=many"])
    with pytest.raises(UserError, match="expected SECTION.KEY=VALUE"):
        params.load_params(path, ["tokenize.vocab_size"])
    with pytest.raises(UserError, match="tokenize.vocab_size is a value, not a section"):
        params.load_params(path, ["tokenize.vocab_size.x=1"])


def test_yaml_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("tokenize:\n  kind: bpe\n  vocab_size: [1, 2\n")
    with pytest.raises(UserError, match=r"params.yaml:\d+: invalid YAML"):
        params.load_params(path)
    with pytest.raises(UserError, match="params file not found"):
        params.load_params(tmp_path / "missing.yaml")
    path.write_text("- a list\n")
    with pytest.raises(UserError, match="expected a mapping"):
        params.load_params(path)


def test_every_field_has_a_description():
    for section in SECTIONS:
        model = Params.model_fields[section].annotation
        for key, _, description in params.describe(model, section):
            assert description, f"{key} has no description"

