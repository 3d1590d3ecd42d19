"""Property-based tests: whatever a params file or a data file holds, gptpipe answers with a result or one
UserError, never a traceback."""

import json
import os
import string
from pathlib import Path

import numpy as np
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline.config.all import Params
from pipeline.config.prepare import PrepareConfig
from pipeline.errors import UserError
from pipeline.params import load_params, validate_params
from pipeline.prepare.stage import prepare_corpus
from pipeline.tokens import open_tokens

# CI replays the same examples every run (a failure there reproduces); elsewhere each run explores new ones.
FUZZ = settings(max_examples=300, deadline=None, derandomize=bool(os.environ.get("CI")),
                suppress_health_check=[HealthCheck.function_scoped_fixture])

values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from(["1e30", "3e-05", "true", "null", "-1", "gpt2", "../..", "data", "1" * 40]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


def keys(model: type, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, nested sections included."""
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        sub = field.annotation if isinstance(field.annotation, type) else next(
            (a for a in getattr(field.annotation, "__args__", ()) if isinstance(a, type) and hasattr(a, "model_fields")), None)
        if sub is not None and hasattr(sub, "model_fields"):
            out += keys(sub, prefix + name + ".")
    return out


KEYS = keys(Params)


def put(raw: dict, dotted: str, value) -> None:
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS) | st.text(min_size=1, max_size=10), values), min_size=1, max_size=4))
def test_any_params_validate_or_fail_with_one_user_error(changes):
    raw = Params().model_dump(mode="json")
    for key, value in changes:
        put(raw, key, value)
    try:
        assert isinstance(validate_params(raw), Params)
        event("valid")
    except UserError as e:
        assert str(e).startswith("params: ")
        event("one UserError")


@FUZZ
@given(st.text(alphabet=string.printable + "é☃\0", max_size=300))
def test_any_params_file_text_loads_or_fails_with_one_user_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("p") / "params.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_params(path)
        event("valid")
    except UserError as e:
        assert str(path) in str(e)
        event("one UserError")


@FUZZ
@given(st.binary(max_size=3000), st.sampled_from([".txt", ".jsonl", ".json", ".csv", ".tsv", ".md"]),
       st.sampled_from([None, "\n\n", "\n"]), st.sampled_from(["strict", "replace"]))
def test_any_data_file_prepares_or_fails_with_one_user_error(tmp_path_factory, data, suffix, separator, errors):
    root = tmp_path_factory.mktemp("d")
    (root / f"corpus{suffix}").write_bytes(data)
    cfg = PrepareConfig(source={"kind": "files", "path": str(root / f"corpus{suffix}"), "separator": separator if suffix in (".txt", ".md") else None},
                        unicode_errors=errors, out_dir=str(root / "prepared"))
    try:
        manifest = prepare_corpus(cfg)
        assert sum(manifest["documents"].values()) >= 1
        event("prepared")
    except UserError as e:
        assert "corpus" in str(e) or "prepare." in str(e), str(e)
        event("one UserError")


@FUZZ
@given(st.binary(max_size=400))
def test_any_token_file_opens_or_fails_with_one_user_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("t") / "train.bin"
    path.write_bytes(data)
    try:
        open_tokens(path, verify=True)
        event("opened")
    except UserError as e:
        assert str(path) in str(e)
        event("one UserError")


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(min_value=0, max_value=200), st.integers(min_value=1, max_value=255)), max_size=6),
       cut=st.none() | st.integers(min_value=0, max_value=300), forge_crc=st.booleans())
def test_any_damage_to_a_real_token_file_opens_or_fails_with_one_user_error(tmp_path_factory, edits, cut, forge_crc):
    """Random bytes never pass the magic; damage to a real file reaches the header fields, the CRC and the ids."""
    import zlib

    from pipeline.tokens import HEADER, HEADER_BYTES, write_tokens

    path = tmp_path_factory.mktemp("t") / "train.bin"
    write_tokens(path, np.arange(60, dtype=np.uint16) % 50, vocab_size=50, eot_id=0)
    data = bytearray(path.read_bytes())
    for offset, flip in edits:  # the header is bytes 0-63, the ids follow
        if offset < len(data):
            data[offset] ^= flip
    if cut is not None:
        data = data[:cut]
    if forge_crc and len(data) >= HEADER_BYTES:  # a forger who recomputes the CRC: the id check must catch what is left
        fields = list(HEADER.unpack_from(data))
        fields[5] = zlib.crc32(bytes(data[HEADER_BYTES:]))
        HEADER.pack_into(data, 0, *fields)
    path.write_bytes(bytes(data))
    try:
        file = open_tokens(path, verify=True)
        assert len(file.tokens) == 0 or int(file.tokens.max()) < file.vocab_size
        event("opened")
    except UserError as e:
        assert str(path) in str(e)
        event("one UserError")


def test_the_fuzzed_keys_cover_the_schema():
    assert {"prepare.source.kind", "train.lr", "model.n_layer", "report.out_dir"} <= set(KEYS)
    assert json.loads(json.dumps(Params().model_dump(mode="json")))  # the base the mutations start from
    assert yaml.safe_load(yaml.safe_dump({"k": "v"})) == {"k": "v"}
    assert Path(__file__).is_file()
