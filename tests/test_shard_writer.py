"""tokens.py's shard writer, the one both tokenize and imports write with: exact shards whatever the pieces, and a
writer resumed from its state() making the same files as one never stopped."""

import numpy as np
import pytest

from pipeline.layout import TokensDir
from pipeline.tokens import ShardWriter, TokenWriter, check_resume, open_split, write_tokens

IDS = np.random.default_rng(0).integers(0, 300, 2_500).astype(np.int64)


def write(out: TokensDir, pieces: list[int], shard_tokens: int = 1000) -> list[int]:
    writer = ShardWriter(out, "train", 300, 0, shard_tokens)
    start = 0
    for size in pieces:
        writer.write(IDS[start : start + size])
        start += size
    return writer.close()


def test_shards_are_exact_whatever_the_pieces_and_match_whole_token_files(tmp_path):
    one = TokensDir(tmp_path / "one")
    assert write(one, [2_500]) == [1000, 1000, 500]
    many = TokensDir(tmp_path / "many")
    assert write(many, [7, 993, 1, 1_400, 99]) == [1000, 1000, 500]
    for index in range(3):
        write_tokens(tmp_path / "ref.bin", IDS[index * 1000 : (index + 1) * 1000], 300, 0)
        assert one.shard("train", index).read_bytes() == many.shard("train", index).read_bytes() == (tmp_path / "ref.bin").read_bytes()
    assert sorted(p.name for p in many.root.iterdir()) == ["train-00000.bin", "train-00001.bin", "train-00002.bin"]
    assert np.array_equal(np.asarray(open_split(many, "train", {"vocab_size": 300, "eot_id": 0})), IDS)


def test_an_exact_multiple_leaves_no_empty_shard_and_nothing_makes_one_empty_shard(tmp_path):
    assert write(TokensDir(tmp_path / "a"), [2_000]) == [1000, 1000]
    assert not list((tmp_path / "a").glob("*.tmp")) and not (tmp_path / "a" / "train-00002.bin").exists()
    assert write(TokensDir(tmp_path / "b"), []) == [0]


def test_a_writer_resumed_from_its_state_writes_what_one_never_stopped_writes(tmp_path):
    write(TokensDir(tmp_path / "ref"), [2_500])
    out = TokensDir(tmp_path / "out")
    writer = ShardWriter(out, "train", 300, 0, 1000)
    writer.write(IDS[:1_300])
    state = writer.state()
    writer.write(IDS[1_300:1_450])  # written after the state, then killed: cut off on resume
    assert (state["shards"], state["partial"]) == ([1000], 300)
    check_resume(out, "train", state, 300)
    resumed = ShardWriter(out, "train", 300, 0, 1000, resume=state)
    assert resumed.tokens == 1_300
    resumed.write(IDS[1_300:])
    assert resumed.close() == [1000, 1000, 500]
    for index in range(3):
        assert out.shard("train", index).read_bytes() == TokensDir(tmp_path / "ref").shard("train", index).read_bytes()


def test_a_shard_finished_after_the_last_state_is_resumed_as_the_partial_it_was(tmp_path):
    out = TokensDir(tmp_path / "out")
    writer = ShardWriter(out, "train", 300, 0, 1000)
    writer.write(IDS[:1_700])
    state = writer.state()
    writer.write(IDS[1_700:2_000])  # the second shard finished, and the kill came before the next state
    assert out.shard("train", 1).is_file() and not TokenWriter.temporary(out.shard("train", 1)).exists()
    check_resume(out, "train", state, 300)
    resumed = ShardWriter(out, "train", 300, 0, 1000, resume=state)
    resumed.write(IDS[1_700:])
    assert resumed.close() == [1000, 1000, 500]
    assert np.array_equal(np.asarray(open_split(out, "train", {"vocab_size": 300, "eot_id": 0})), IDS)


def test_what_a_state_does_not_describe_is_never_resumed(tmp_path):
    out = TokensDir(tmp_path / "out")
    writer = ShardWriter(out, "train", 300, 0, 1000)
    writer.write(IDS[:1_300])
    state = writer.state()
    with pytest.raises(ValueError, match="partial shard"):
        ShardWriter(out, "train", 300, 0, 1000, resume={**state, "partial_crc32": state["partial_crc32"] ^ 1})
    with pytest.raises(ValueError):
        check_resume(out, "train", {**state, "crc32": [state["crc32"][0] ^ 1]}, 300)
    with pytest.raises(ValueError, match="short"):
        check_resume(out, "train", {**state, "partial": 5_000}, 300)
    with pytest.raises(ValueError):
        check_resume(out, "train", {"shards": [1000]}, 300)  # not a state this writer made
