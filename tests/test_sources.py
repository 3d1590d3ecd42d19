"""Sources, normalisation, the train/val split and the prepare stage's output, on files written here."""

import hashlib
import http.server
import json
import os
import random
import socket
import sys
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config.prepare import PrepareConfig, SourceConfig
from pipeline.errors import UserError
from pipeline.prepare import formats, plan
from pipeline.prepare.documents import iter_prepared, prepared_size
from pipeline.prepare.formats import SourceStats
from pipeline.prepare.plan import normalize, split_of
from pipeline.prepare.sources import iter_source, source_size
from pipeline.prepare.stage import prepare_corpus


def read(errors="strict", stats=None, download_dir="data/cache/downloads", **source):
    return list(iter_source(SourceConfig(**source), unicode_errors=errors, stats=stats or SourceStats(), download_dir=download_dir))


def files(path, **source):
    return read(kind="files", path=str(path), **source)


def prepare(tmp_path, **cfg):
    cfg.setdefault("out_dir", str(tmp_path / "prepared"))
    return prepare_corpus(PrepareConfig(**cfg))


def write_docs(path, texts):
    path.write_text("\n\n".join(texts), encoding="utf-8")
    return {"kind": "files", "path": str(path), "separator": "\n\n"}


# ------------------------------------------------------------------------------------------- builtin


def test_builtin_pydoc_topics():
    stats = SourceStats()
    docs = read(stats=stats)
    assert len(docs) > 50 and all(isinstance(d, str) for d in docs)
    (record,) = stats.inputs
    assert record["name"] == "builtin:pydoc_topics" and record["documents"] == len(docs)
    assert record["python"] == ".".join(map(str, sys.version_info[:3]))
    assert source_size(PrepareConfig()) == record["bytes"]


def test_builtin_stdlib():
    docs = read(kind="builtin", name="stdlib")
    assert len(docs) > 50 and any("import" in d for d in docs)


# --------------------------------------------------------------------------------------------- files


def test_text_whole_file_and_separator(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("one\r\n\r\ntwo é\r\n\r\n\r\nthree".encode())
    assert files(path) == ["one\n\ntwo é\n\n\nthree"]
    assert files(path, separator="\n\n") == ["one", "two é", "\nthree"]  # CRLF files split at "\n\n" too


def test_text_separator_across_chunks(tmp_path, monkeypatch):
    path = tmp_path / "a.md"
    text = "".join(f"doc {i} ünïcödé €\r\n--\r\n" for i in range(20))
    path.write_bytes(text.encode())
    expected = files(path, separator="\n--\n")
    monkeypatch.setattr(formats, "CHUNK", 3)  # cuts characters, "\r\n" and the separator
    assert files(path, separator="\n--\n") == expected
    assert expected[:2] == ["doc 0 ünïcödé €", "doc 1 ünïcödé €"] and len(expected) == 21


def test_folder_and_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ["b.txt", "a.txt", "sub/c.txt", ".secret.txt", ".hidden/d.txt"]:
        (tmp_path / name).write_text(name.split("/")[-1].split(".")[0] or "hidden")
    assert files(tmp_path) == ["a", "b", "c"]
    assert files(tmp_path / "*.txt") == ["a", "b"]
    assert files(tmp_path / "**" / "*.txt") == ["a", "b", "c"]


def test_jsonl_json_csv_tsv_parquet_with_custom_column(tmp_path):
    rows = [{"id": 1, "body": "first, with \"quotes\"\nand a newline"}, {"id": 2, "body": "second ü"}]
    texts = [r["body"] for r in rows]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"meta": 1, "data": rows}))
    (tmp_path / "strings.json").write_text(json.dumps(texts))
    pq.write_table(pa.table({"id": [1, 2, 3], "body": [*texts, None]}), tmp_path / "d.parquet")
    import csv

    for name, delimiter in [("d.csv", ","), ("d.tsv", "\t")]:  # with a BOM, as spreadsheets write them
        with open(tmp_path / name, "w", newline="", encoding="utf-8-sig") as f:
            writer = csv.DictWriter(f, ["id", "body"], delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    for name in ["d.jsonl", "d.json", "wrapped.json", "strings.json", "d.csv", "d.tsv"]:
        assert files(tmp_path / name, text_column="body") == texts, name
    assert files(tmp_path / "d.parquet", text_column="body") == [*texts, ""]  # null: an empty document
    (tmp_path / "data.log").write_text(json.dumps(rows[0]) + "\n")
    assert files(tmp_path / "data.log", format="jsonl", text_column="body") == texts[:1]


def test_missing_inputs(tmp_path):
    with pytest.raises(UserError, match="nope.txt: no such file"):
        files(tmp_path / "nope.txt")
    with pytest.raises(UserError, match=r"\*.zip' matches no files"):
        files(tmp_path / "*.zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="folder .*empty has no"):
        files(tmp_path / "empty")


def test_jsonl_errors_name_file_line_and_keys(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok", \n')
    with pytest.raises(UserError, match=r"d.jsonl:2: malformed JSON"):
        files(path)
    path.write_text('{"text": "ok"}\n\n{"body": "x", "id": 3}\n')
    with pytest.raises(UserError, match=r"d.jsonl:3: no 'text' column \(it has: body, id\); set text_column"):
        files(path)
    path.write_text('{"text": 5}\n')
    with pytest.raises(UserError, match=r"d.jsonl:1: 'text' holds int"):
        files(path)


def test_json_csv_parquet_missing_column(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"text": "a"}, {"body": "b"}]))
    with pytest.raises(UserError, match=r"d.json: item 1: no 'text' column \(it has: body\)"):
        files(tmp_path / "d.json")
    (tmp_path / "d.csv").write_text("id,body\n1,hello\n")
    with pytest.raises(UserError, match=r"d.csv: the header: no 'text' column \(it has: id, body\)"):
        files(tmp_path / "d.csv")
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "d.parquet")
    with pytest.raises(UserError, match=r"d.parquet: no 'text' column \(it has: body\)"):
        files(tmp_path / "d.parquet")


# ----------------------------------------------------------------------------------------- invalid UTF-8


@pytest.mark.parametrize("chunk", [1 << 20, 4])
def test_invalid_utf8_strict_names_file_and_offset(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(formats, "CHUNK", chunk)
    cases = {
        "a.txt": "ok é\nbad ".encode() + b"\xff",  # offset 10
        "b.jsonl": b'{"text": "ok"}\n{"text": "b\xc3(d"}\n',  # offset 15 + 11
        "c.csv": b"id,text\n1,ok\n2,caf\xe9\n",  # offset 13 + 5
    }
    for (name, data), offset in zip(cases.items(), [10, 26, 18]):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=rf"{name}: invalid UTF-8 at byte {offset} "):
            files(tmp_path / name)
    (tmp_path / "d.txt").write_bytes("abc\u20ac".encode()[:-1] + b"z")  # a character cut short
    with pytest.raises(UserError, match=r"d.txt: invalid UTF-8 at byte 3 "):
        files(tmp_path / "d.txt", separator="\n")


def test_invalid_utf8_replace_counts(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 \xff\xfe ok")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "x\xffy"}\n')
    stats = SourceStats()
    assert files(tmp_path / "a.txt", errors="replace", stats=stats) == ["caf\ufffd \ufffd\ufffd ok"]
    assert files(tmp_path / "b.jsonl", errors="replace", stats=stats) == ["x\ufffdy"]
    assert stats.replaced == 4
    manifest = prepare(tmp_path, source={"kind": "files", "path": str(tmp_path / "a.txt"), "separator": " "},
                       unicode_errors="replace")
    assert manifest["replaced"] == 3


# ------------------------------------------------------------------------------------------ url and hf


@pytest.fixture
def server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www; `requests` counts the GETs."""
    (tmp_path / "www").mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "www"), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", tmp_path / "www", requests
    httpd.shutdown()
    httpd.server_close()


def test_url_downloads_once(tmp_path, server, monkeypatch):
    base, www, requests = server
    (www / "corpus.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n')
    url = f"{base}/corpus.jsonl"
    cache = tmp_path / "cache"
    cfg = PrepareConfig(source={"kind": "url", "url": url}, download_dir=str(cache))
    assert source_size(cfg) is None  # not downloaded yet
    stats = SourceStats()
    assert read(kind="url", url=url, text_column="body", stats=stats, download_dir=cache) == ["one", "two"]
    assert read(kind="url", url=url, text_column="body", download_dir=cache) == ["one", "two"]
    assert requests == ["/corpus.jsonl"]
    (cached,) = (tmp_path / "cache").iterdir()
    assert cached.name == hashlib.sha256(url.encode()).hexdigest()[:16] + "-corpus.jsonl"
    assert stats.inputs[0]["url"] == url and source_size(cfg) == cached.stat().st_size
    assert stats.inputs[0]["sha256"] == hashlib.sha256(cached.read_bytes()).hexdigest()


def test_url_errors(tmp_path, server, monkeypatch):
    base, _, _ = server
    with pytest.raises(UserError, match=r"could not download .*/missing.txt: HTTP 404.*Offline\?"):
        read(kind="url", url=f"{base}/missing.txt", download_dir=tmp_path / "cache")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match=rf"could not download http://127.0.0.1:{port}/x.txt: .*kind=files"):
        read(kind="url", url=f"http://127.0.0.1:{port}/x.txt", download_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no half-downloaded file


def test_hf_local_json(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # its lock files stay here
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "one"}\n{"body": "two"}\n')
    stats = SourceStats()
    assert read(kind="hf", dataset="json", data_files=str(path), text_column="body", stats=stats) == ["one", "two"]
    assert stats.inputs[0]["documents"] == 2
    with pytest.raises(UserError, match=r"json row 0: no 'text' column \(it has: body\)"):
        read(kind="hf", dataset="json", data_files=str(path))


def test_hf_unreachable_dataset():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: fails fast instead of retrying
    with pytest.raises(UserError, match=r"could not load 'no-such-user/no-such-dataset' .*HF_DATASETS_OFFLINE"):
        read(kind="hf", dataset="no-such-user/no-such-dataset")


# ------------------------------------------------------------------------------- normalisation and split


def test_normalize():
    assert normalize("  a\r\nb\rc\n\n", nfc=True) == "a\nb\nc"
    assert normalize("e\u0301", nfc=True) == "\u00e9"
    assert normalize("e\u0301", nfc=False) == "e\u0301"


def test_split_is_deterministic_and_respects_fraction():
    texts = [f"document number {i}" for i in range(1000)]
    val = {t for t in texts if split_of(t.encode(), 1337, 0.1)[0] == "val"}
    assert val == {t for t in reversed(texts) if split_of(t.encode(), 1337, 0.1)[0] == "val"}
    assert val != {t for t in texts if split_of(t.encode(), 7, 0.1)[0] == "val"}
    assert 70 <= len(val) <= 130
    assert not any(split_of(t.encode(), 1337, 0.0)[0] == "val" for t in texts)


def test_prepare_split_is_order_independent(tmp_path):
    texts = [f"doc {i}" for i in range(200)]
    shuffled = random.Random(0).sample(texts, len(texts))
    prepare(tmp_path, source=write_docs(tmp_path / "a.txt", texts), out_dir=str(tmp_path / "a"))
    prepare(tmp_path, source=write_docs(tmp_path / "b.txt", shuffled), out_dir=str(tmp_path / "b"))
    for split in ["train", "val"]:
        assert sorted(iter_prepared(tmp_path / "a", split)) == sorted(iter_prepared(tmp_path / "b", split))
    assert 0 < len(list(iter_prepared(tmp_path / "a", "val"))) < 50


# -------------------------------------------------------------------------------------- prepare_corpus


def test_prepare_output_manifest_and_rerun(tmp_path):
    texts = [f"document {i}" for i in range(50)] + ["document 3", "document 3 ", "x"]
    source = write_docs(tmp_path / "a.txt", texts)
    cfg, done = PrepareConfig(source=source, min_chars=2, out_dir=str(tmp_path / "out")), []
    manifest = prepare_corpus(cfg, progress=done.append)
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == [".gptpipe-output", "manifest.json", "train.jsonl", "val.jsonl"]
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "out"]  # no temp folders left behind
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["dropped"] == {"short": 1, "duplicate": 2}
    train, val = list(iter_prepared(out, "train")), list(iter_prepared(out, "val"))
    assert sorted(train + val) == sorted(f"document {i}" for i in range(50))
    assert manifest["documents"]["val"] == len(val) and manifest["bytes"]["val"] == sum(len(t.encode()) for t in val)
    assert prepared_size(out) == sum(len(t.encode()) for t in train + val)
    (record,) = manifest["inputs"]
    assert record["sha256"] == hashlib.sha256((tmp_path / "a.txt").read_bytes()).hexdigest()
    assert record["role"] == "source" and len(manifest["input_hash"]) == 64
    assert manifest["params"]["min_chars"] == 2
    assert sum(done) == record["bytes"] == source_size(cfg)

    write_docs(tmp_path / "a.txt", ["new one", "new two"])
    again = prepare(tmp_path, source=source, out_dir=str(out))
    assert sorted([*iter_prepared(out, "train"), *iter_prepared(out, "val")]) == ["new one", "new two"]
    assert sum(again["documents"].values()) == 2
    assert again["input_hash"] != manifest["input_hash"]
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "out"]


def test_prepare_failure_keeps_previous_output(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    prepare(tmp_path, source={"kind": "files", "path": str(path)})
    path.write_text('{"text": "c"}\n{"text": "d"}\nbroken\n')
    with pytest.raises(UserError, match="d.jsonl:3: malformed"):
        prepare(tmp_path, source={"kind": "files", "path": str(path)})
    out = tmp_path / "prepared"
    assert sorted([*iter_prepared(out, "train"), *iter_prepared(out, "val")]) == ["a", "b"]
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "prepared"]


def test_dedup(tmp_path):
    source = write_docs(tmp_path / "a.txt", ["same", "same", "other", "same\r\n"])
    assert prepare(tmp_path, source=source)["dropped"]["duplicate"] == 2
    kept = prepare(tmp_path, source=source, dedup=False)
    assert kept["dropped"]["duplicate"] == 0 and sum(kept["documents"].values()) == 4


@pytest.mark.parametrize("lands_in", ["train", "val"])
def test_an_empty_split_gets_the_nearest_document(tmp_path, lands_in):
    # Three documents that all fall in one split: the one nearest the other split moves there.
    texts = [t for t in (f"doc {i}" for i in range(100)) if split_of(t.encode(), 1337, 0.5)[0] == lands_in][:3]
    manifest = prepare(tmp_path, source=write_docs(tmp_path / "a.txt", texts), val_fraction=0.5)
    other = "val" if lands_in == "train" else "train"
    assert manifest["moved"] == {"from": lands_in, "to": other, "documents": 1, "reason": f"{other} was empty"}
    positions = {t: split_of(t.encode(), 1337, 0.5)[1] for t in texts}
    nearest = (min if lands_in == "train" else max)(texts, key=positions.get)
    assert list(iter_prepared(tmp_path / "prepared", other)) == [nearest]
    assert sorted(iter_prepared(tmp_path / "prepared", lands_in)) == sorted(set(texts) - {nearest})
    assert manifest["documents"][other] == 1 and manifest["bytes"][other] == len(nearest)


def test_one_document_fails(tmp_path):
    write_docs(tmp_path / "a.txt", ["alpha", "beta"])
    with pytest.raises(UserError, match="the corpus is one document; set prepare.source.separator"):
        prepare(tmp_path, source={"kind": "files", "path": str(tmp_path / "a.txt")})


def test_empty_corpus(tmp_path):
    with pytest.raises(UserError, match=r"prepare.source: no documents from files .*a.txt \(dropped 3 shorter"):
        prepare(tmp_path, source=write_docs(tmp_path / "a.txt", ["  ", "x", "y"]), min_chars=2)


def test_val_source(tmp_path):
    source = write_docs(tmp_path / "a.txt", ["t1", "t2", "t3"])
    manifest = prepare(tmp_path, source=source, val_source=write_docs(tmp_path / "b.txt", ["v1", "t1"]),
                       val_fraction=0.5)
    out = tmp_path / "prepared"
    assert list(iter_prepared(out, "train")) == ["t1", "t2", "t3"] and list(iter_prepared(out, "val")) == ["v1"]
    assert [r["role"] for r in manifest["inputs"]] == ["source", "val_source"]
    with pytest.raises(UserError, match="prepare.val_source: no documents"):
        prepare(tmp_path, source=source, val_source=write_docs(tmp_path / "b.txt", ["t1"]))


def test_iter_prepared_missing(tmp_path):
    with pytest.raises(UserError, match="run the prepare stage first"):
        list(iter_prepared(tmp_path, "train"))


def test_tail_split_holds_out_the_last_fraction_of_the_text_cut_at_that_character(tmp_path):
    text = "".join(f"line {i} of the play\n" for i in range(500)).strip()
    (tmp_path / "play.txt").write_text(text)
    manifest = prepare(tmp_path, source={"kind": "files", "path": str(tmp_path / "play.txt"), "separator": "\n"}, split="tail")
    train = list(iter_prepared(tmp_path / "prepared", "train"))
    val = list(iter_prepared(tmp_path / "prepared", "val"))
    joined = "".join(train) + "".join(val)
    assert joined == text.replace("\n", "")  # every character once, in order (documents were the lines)
    assert len("".join(train)) == int(len(joined) * 0.9)  # nanoGPT's data[:int(n * 0.9)]
    assert manifest["documents"] == {"train": len(train), "val": len(val)}
    whole = prepare(tmp_path, source={"kind": "files", "path": str(tmp_path / "play.txt")}, split="tail", out_dir=str(tmp_path / "one"))
    assert whole["documents"] == {"train": 1, "val": 1}  # one document, cut in two


# ------------------------------------------------------------------------- store: index (no second copy)


def documents(out):
    from pipeline.prepare.documents import iter_documents

    return {split: [t for s, t in iter_documents(out) if s == split] for split in ("train", "val")}


INDEX_CASES = {
    "hash split": {"split": "hash"},
    "tail split": {"split": "tail"},
    "val_source": {"val_source": "b.txt"},
    "short and no dedup": {"min_chars": 12, "dedup": False},
    "an empty split": {"val_fraction": 1e-6},
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_index_store_gives_the_documents_text_store_writes(tmp_path, case):
    """store: index keeps no text, only each document's fate; reading the source again through it gives exactly the
    documents, splits, counts and manifest that store: text writes."""
    rng = random.Random(0)
    texts = [f"paragraph {rng.randrange(300)} of {'long ' * rng.randrange(5)}text" for _ in range(400)]  # many repeats
    cfg = dict(INDEX_CASES[case], source=write_docs(tmp_path / "a.txt", texts))
    if "val_source" in cfg:
        cfg["val_source"] = write_docs(tmp_path / "b.txt", texts[:50] + ["only in val"])
    text = prepare(tmp_path, **cfg, store="text", out_dir=str(tmp_path / "text"))
    index = prepare(tmp_path, **cfg, store="index", out_dir=str(tmp_path / "index"))
    assert sorted(os.listdir(tmp_path / "index")) == [".gptpipe-output", "manifest.json", "plan.bin"]
    assert (tmp_path / "index" / "plan.bin").stat().st_size == index["plan"]["documents"] == len(texts) + (51 if "val_source" in cfg else 0)
    assert documents(tmp_path / "index") == documents(tmp_path / "text")
    assert {k: v for k, v in index.items() if k not in ("params", "plan")} == {k: v for k, v in text.items() if k != "params"}
    assert text["dropped"]["duplicate"] > 0 or case == "short and no dedup"
    assert bool(text["moved"]) == (case == "an empty split")


def test_dedup_keeps_the_first_of_each_document_in_order(tmp_path, monkeypatch):
    """Deduplication by buckets on disk, in blocks: the same documents, in the same order, as a set in memory."""

    monkeypatch.setattr(plan, "BLOCK", 7)  # many blocks: the per-block numpy steps are exercised
    rng = random.Random(1)
    texts = [f"doc {rng.randrange(3000)}" for _ in range(6000)]
    seen, expected = set(), []
    for t in texts:
        if t not in seen:
            seen.add(t)
            expected.append(t)
    for split in ("hash", "tail"):
        prepare(tmp_path, source=write_docs(tmp_path / "a.txt", texts), split=split, store="index", val_fraction=0.3)
        got = documents(tmp_path / "prepared")
        if split == "hash":
            assert sorted(got["train"] + got["val"]) == sorted(expected)
            assert got["train"] == [t for t in expected if t in set(got["train"])]  # source order within a split
        else:
            assert "".join(got["train"] + got["val"]) == "".join(expected)


def test_index_store_notices_a_changed_source(tmp_path):
    from pipeline.config.tokenize import TokenizeConfig
    from pipeline.tokenize.stage import tokenize_corpus

    source = write_docs(tmp_path / "a.txt", [f"document {i}" for i in range(40)])
    prepare(tmp_path, source=source, store="index")
    write_docs(tmp_path / "a.txt", [f"document {i}" for i in range(39)] + ["edited"])
    cfg = TokenizeConfig(kind="tiktoken", out_dir=str(tmp_path / "tokens"))
    with pytest.raises(UserError, match=r"the source changed since the prepare stage read it \(.*a.txt\); rerun prepare"):
        tokenize_corpus(cfg, tmp_path / "prepared")
    write_docs(tmp_path / "a.txt", [f"document {i}" for i in range(41)])
    with pytest.raises(UserError, match=r"the source changed .*it now has more documents"):
        tokenize_corpus(cfg, tmp_path / "prepared")
    assert not (tmp_path / "tokens").exists()


def test_a_damaged_plan_is_one_message(tmp_path):
    from pipeline.prepare.documents import iter_documents

    prepare(tmp_path, source=write_docs(tmp_path / "a.txt", [f"document {i}" for i in range(40)]), store="index")
    plan = tmp_path / "prepared" / "plan.bin"
    plan.write_bytes(plan.read_bytes()[:10] + b"\x09" + plan.read_bytes()[11:])
    with pytest.raises(UserError, match=r"prepared: plan.bin holds 9, not a document's fate; rerun prepare"):
        list(iter_documents(tmp_path / "prepared"))
    plan.write_bytes(plan.read_bytes()[:-1])
    with pytest.raises(UserError, match=r"plan.bin: missing or not 40 bytes"):
        list(iter_documents(tmp_path / "prepared"))
