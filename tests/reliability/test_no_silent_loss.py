"""Trust, second pass: nothing a user made is deleted, overwritten or silently replaced by a run (issue 18).

Each test reproduces one way data was lost or corrupted silently, on tiny real runs, and holds the fix.
"""

from pathlib import Path

from conftest import run_training, tiny_params


def runs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "checkpoints").iterdir() if p.is_dir())


def test_each_fresh_start_keeps_every_earlier_run(tokens_dir, tmp_path, capfd):
    """`train.resume: never` three times: the first run's checkpoints are still there, each set aside by number."""
    run_training(tiny_params(tokens_dir, tmp_path, max_steps=4, save_interval=4))
    (first,) = runs(tmp_path)
    marker = first / "step-000004" / "state.json"
    first_state = marker.read_text()
    capfd.readouterr()
    for _ in range(2):
        run_training(tiny_params(tokens_dir, tmp_path, max_steps=4, save_interval=4, resume="never"))
    out = capfd.readouterr().out
    names = [p.name for p in runs(tmp_path)]
    assert names == [first.name, f"{first.name}.previous", f"{first.name}.previous.2"], names
    # The oldest run is the one set aside first, untouched.
    assert (tmp_path / "checkpoints" / f"{first.name}.previous" / "step-000004" / "state.json").read_text() == first_state
    assert "nothing deleted" in out and f"{first.name}.previous.2" in out
    # A folder set aside holds these very settings: no empty "since ..." reason is given for the fresh start.
    assert "starting fresh in" in out and ": since" not in out


OUTPUT_ON_INPUT = {
    # (params, the corpus path the user has): each output key pointed at an input, or at the folder holding it
    "train.metrics_dir": ({"train": {"metrics_dir": "data/raw"}}, "data/raw/samples.jsonl"),
    "tokenize.metrics_file": ({"tokenize": {"metrics_file": "data/raw/samples.jsonl"}}, "data/raw/samples.jsonl"),
    "evaluate.metrics_file": ({"evaluate": {"metrics_file": "data/raw/samples.jsonl"}}, "data/raw/samples.jsonl"),
    "sample.out_dir": ({"sample": {"out_dir": "data/raw"}}, "data/raw/samples.jsonl"),
    "report.out_dir": ({"report": {"out_dir": "data/raw"}}, "data/raw/report.md"),
    "train.metrics_dir inside the corpus folder": ({"train": {"metrics_dir": "data/raw/metrics"}}, "data/raw"),
}


def test_no_output_path_can_be_an_input_or_inside_an_input_folder(tmp_path, monkeypatch):
    """Each path a stage writes is checked against every input before anything runs: exit 2, the corpus intact."""
    import pytest
    import yaml
    from typer.testing import CliRunner

    from pipeline import params
    from pipeline.cli import app
    from pipeline.errors import UserError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    corpus = tmp_path / "data" / "raw" / "samples.jsonl"
    corpus.write_text("".join(f'{{"text": "document {i}"}}\n' for i in range(50)))
    for case, (overrides, source) in OUTPUT_ON_INPUT.items():
        raw = {"prepare": {"source": {"kind": "files", "path": source}}, **overrides}
        key = case.split()[0]
        with pytest.raises(UserError, match=rf"{key}.*\(an input\)"):
            params.validate_params(raw)
    # Through a real stage command: one message, exit code 2, and the corpus keeps every byte.
    before = corpus.read_bytes()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"prepare": {"source": {"kind": "files", "path": "data/raw/samples.jsonl"}},
                                                           "train": {"metrics_dir": "data/raw"}}))
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 2 and "train.metrics_dir" in result.output and "Traceback" not in result.output
    assert corpus.read_bytes() == before


# ------------------------------------------------------------------------------ tokenize resume (items 1, 6, 12)


class Interrupt(Exception):
    """Stands for the kill: raised from the progress callback once some shards are finished."""


def corpus(tmp_path: Path, shared: Path, store: str) -> tuple[Path, Path]:
    """A 60 KB slice of tiny Shakespeare prepared with prepare.store (the source file, the prepared folder)."""
    from pipeline.config import PrepareConfig
    from pipeline.prepare.stage import prepare_corpus

    source = tmp_path / "raw" / "corpus.txt"
    source.parent.mkdir()
    source.write_text((shared / "tinyshakespeare.txt").read_text()[:60_000])
    cfg = PrepareConfig.model_validate({"source": {"kind": "files", "path": str(source), "separator": "\n\n"}, "store": store,
                                        "out_dir": str(tmp_path / "prepared")})
    prepare_corpus(cfg)
    return source, tmp_path / "prepared"


def tokenize(prepared: Path, out: Path, stop_after_shards: int | None = None):
    """tokenize_corpus with small shards; interrupted (its .partial folder left) once enough shards are finished."""
    from pipeline.config import TokenizeConfig
    from pipeline.tokenize.stage import tokenize_corpus

    cfg = TokenizeConfig(kind="tiktoken", out_dir=str(out), shard_tokens=1024, chunk_bytes=1024, workers=1)
    partial = out.with_name(f".{out.name}.partial")

    def progress(_: int) -> None:
        if stop_after_shards and len(list(partial.glob("train-*.bin"))) >= stop_after_shards and (partial / "progress.json").is_file():
            raise Interrupt

    if stop_after_shards:
        import pytest

        with pytest.raises(Interrupt):
            tokenize_corpus(cfg, prepared, progress=progress)
        return partial
    return tokenize_corpus(cfg, prepared)


def contents(folder: Path) -> dict[str, str]:
    """Every file of a folder by its sha256: equal for byte-identical folders."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(folder.rglob("*")) if p.is_file()}


def damage_finished_shard(partial: Path) -> None:
    shard = partial / "train-00001.bin"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40  # one id changed, the header (and its CRC) left as it was
    shard.write_bytes(bytes(data))


def damage_partial_shard(partial: Path) -> None:
    (tmp,) = partial.glob("train-*.bin.tmp")
    data = bytearray(tmp.read_bytes())
    data[70] ^= 0x01
    tmp.write_bytes(bytes(data))


def swap_shards(partial: Path) -> None:
    a, b = partial / "train-00000.bin", partial / "train-00001.bin"
    a.rename(partial / "swap")
    b.rename(a)
    (partial / "swap").rename(b)


def edit_progress(partial: Path) -> None:
    import json

    state = json.loads((partial / "progress.json").read_text())
    state["train"]["position"] += 3  # three documents would be skipped
    (partial / "progress.json").write_text(json.dumps(state))


def stray_temporary(partial: Path) -> None:
    (partial / ".progress.json.k1ll3d.tmp").write_text('{"identity": ')


RESUME_DAMAGE = {"a finished shard with a flipped id": damage_finished_shard, "a partial shard with a flipped byte": damage_partial_shard,
                 "two finished shards swapped": swap_shards, "a position edited in progress.json": edit_progress,
                 "a temporary file a kill left": stray_temporary}


def test_a_damaged_interrupted_tokenize_is_never_resumed_into_the_output(tmp_path, shared_data):
    """Each damage to what an interrupted run left: the rerun's output is byte-identical to a run never interrupted."""
    _, prepared = corpus(tmp_path, shared_data, "text")
    tokenize(prepared, tmp_path / "reference")
    reference = contents(tmp_path / "reference")
    for n, (case, damage) in enumerate(RESUME_DAMAGE.items()):
        out = tmp_path / f"out{n}"
        partial = tokenize(prepared, out, stop_after_shards=3)
        damage(partial)
        tokenize(prepared, out)
        assert contents(out) == reference, case
        assert not partial.exists(), case


def test_a_source_edited_then_restored_does_not_keep_shards_of_the_edit(tmp_path, shared_data):
    """prepare.store: index: tokenize reads the sources again. An edit after prepare stops it (after some shards were
    finished from the edited text); the user restores the file and reruns: the output is that of the restored text."""
    import pytest

    from pipeline.errors import UserError

    source, prepared = corpus(tmp_path, shared_data, "index")
    tokenize(prepared, tmp_path / "reference")
    reference = contents(tmp_path / "reference")
    original = source.read_text()
    source.write_text(original.replace("First Citizen", "First Senator", 1))  # same documents, other text
    with pytest.raises(UserError, match="the source changed"):
        tokenize(prepared, tmp_path / "out")
    assert list((tmp_path / ".out.partial").glob("train-*.bin")), "no shard of the edited text was kept: the case is not reproduced"
    source.write_text(original)
    tokenize(prepared, tmp_path / "out")
    assert contents(tmp_path / "out") == reference
