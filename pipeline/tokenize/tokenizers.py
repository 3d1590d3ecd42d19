"""Tokenizers behind one small interface: tiktoken, char (characters of the train split), bpe (trained here), hf."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from pipeline.errors import UserError
from pipeline.files import absent, seal_problem, write_json_atomic, write_text_atomic

if TYPE_CHECKING:  # an annotation only: train, evaluate and sample load tokenizers without tokenize's schema
    from pipeline.config.tokenize import TokenizeConfig

EOT = "<|endoftext|>"
UNK = "<unk>"
META_FILE = "tokenizer_meta.json"


class Tokenizer:
    """Ordinary text <-> ids in [0, vocab_size). Special-token strings in the text are plain text (hf: see parse_special).

    Each document is encoded as [bos] ids [eot], the BOS only when add_bos (Llama- and Gemma-style models expect
    it; for the other kinds the BOS is the end-of-text id, as build-nanogpt writes its shards).
    """

    kind: str
    vocab_size: int
    eot_id: int
    add_bos: bool = False

    @property
    def bos_id(self) -> int:
        return self.eot_id
    # True where encode_batch already spreads over every core (HF tokenizers' own thread pool, sized by
    # RAYON_NUM_THREADS): tokenize_corpus then feeds it from one thread instead of oversubscribing.
    parallel_inside = False

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        """The ids of every text, each followed by eot_id (and led by bos_id when add_bos), as one uint32 array."""
        ids = self._encode_documents(texts)
        if self.add_bos and ids.size:
            ends = np.flatnonzero(ids == self.eot_id)
            ids = np.insert(ids, np.concatenate([[0], ends[:-1] + 1]), self.bos_id)
        return ids

    def _encode_documents(self, texts: list[str]) -> np.ndarray:
        """doc1 EOT doc2 EOT ...; kinds that can do it in fewer calls override this."""
        ids: list[int] = []
        for row in self.encode_batch(texts):
            ids += row
            ids.append(self.eot_id)
        return np.array(ids, dtype=np.uint32)

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt as a document starts: BOS first when add_bos."""
        return ([self.bos_id] if self.add_bos else []) + self.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def settings(self) -> dict:
        """What defines the tokenizer besides its files; saved in tokenizer_meta.json for _load."""
        return {}

    def describe(self) -> dict:
        """For meta.json."""
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id, "add_bos": self.add_bos, **self.settings()}

    def save(self, folder: str | Path) -> None:
        """Write a folder that load_tokenizer() reads back with no corpus."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._save(folder)
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id, "add_bos": self.add_bos, **self.settings()}
        write_json_atomic(folder / META_FILE, meta)  # last: a folder with it is complete

    def save_for_transformers(self, folder: str | Path) -> bool:
        """Write the files transformers' AutoTokenizer reads into folder; False for kinds it cannot read (char, tiktoken)."""
        if self.kind not in ("bpe", "hf"):
            return False
        self._save(Path(folder))
        return True

    def _save(self, folder: Path) -> None:
        """Write the kind's own files (none for tiktoken: the encoding name is enough)."""


def as_list(ids: Iterable[int]) -> list[int]:
    """Python ints, which every backend accepts (a token file's memmap holds numpy uint16/uint32)."""
    return ids.tolist() if isinstance(ids, np.ndarray) else list(ids)


# -------------------------------------------------------------------------------------------- tiktoken


class TiktokenTokenizer(Tokenizer):
    kind = "tiktoken"

    def __init__(self, encoding: str):
        import tiktoken

        names = tiktoken.list_encoding_names()
        if encoding not in names:
            raise UserError(f"tokenize.encoding: unknown tiktoken encoding {encoding!r}; known: {', '.join(names)}")
        try:
            self.enc = tiktoken.get_encoding(encoding)
        # What fetching raises: requests errors (OSError), a hash mismatch (ValueError), blobfile missing.
        except (OSError, ValueError, ImportError) as e:
            reason = (str(e).splitlines() or [""])[0]
            reason = reason if len(reason) <= 100 else reason[:100] + "..."
            raise UserError(
                f"tokenize.encoding: tiktoken encoding {encoding!r} could not be loaded ({type(e).__name__}: {reason}); "
                "set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cache files (copied from a machine where it loaded) "
                "or go online once so tiktoken can download them"
            ) from e
        self.encoding = encoding
        self.vocab_size = self.enc.n_vocab
        self.eot_id = self.enc.eot_token
        self._local = threading.local()

    def _thread_encoding(self):
        """This thread's own copy of the encoding (built in ~30 ms).

        An Encoding's regex caches favour the thread that used it first: measured, other threads sharing it
        encode ~30% slower, so each worker thread gets its own.
        """
        enc = getattr(self._local, "enc", None)
        if enc is None:
            import tiktoken

            base = self.enc
            enc = self._local.enc = tiktoken.Encoding(
                base.name, pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks, special_tokens=base._special_tokens
            )
        return enc

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def _encode_documents(self, texts: list[str]) -> np.ndarray:
        # One native call per chunk instead of one per document: tiktoken splits at allowed specials and
        # encodes each piece on its own, so this equals encode_ordinary per document with EOT between, and
        # the GIL is released for the whole chunk (per-document calls contend for it: 1.2x on 2 cores, not 2x).
        enc = self._thread_encoding()
        joined = EOT.join(texts) + EOT
        if joined.count(EOT) == len(texts):
            return enc.encode_to_numpy(joined, allowed_special={EOT}, disallowed_special=()).astype(np.uint32)
        # Some document holds the literal string: it must stay text, so encode document by document.
        parts = [np.empty(0, dtype=np.uint32)]
        for text in texts:
            parts += [enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=()), [self.eot_id]]
        return np.concatenate(parts).astype(np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(as_list(ids))

    def settings(self) -> dict:
        return {"encoding": self.encoding}

    @classmethod
    def _load(cls, folder: Path, meta: dict) -> TiktokenTokenizer:
        return cls(meta["encoding"])


# ------------------------------------------------------------------------------------------------ char


class CharTokenizer(Tokenizer):
    """One id per character of the train split (sorted), then <|endoftext|>, then <unk> if used."""

    kind = "char"

    def __init__(self, chars: Iterable[str], unknown_chars: str):
        self.chars = sorted(chars)
        self.unknown_chars = unknown_chars
        self.tokens = self.chars + [EOT] + ([UNK] if unknown_chars == "unk" else [])
        self.vocab_size = len(self.tokens)
        self.eot_id = len(self.chars)
        self.unk_id = self.eot_id + 1 if unknown_chars == "unk" else None
        # Code point -> id (-1: not in the vocabulary); the last entry catches every larger code point.
        codes = np.array([ord(c) for c in self.chars], dtype=np.int64)
        self._table = np.full(int(codes.max(initial=0)) + 2, -1, dtype=np.int32)
        self._table[codes] = np.arange(len(codes), dtype=np.int32)
        self._unknown = 0
        self._lock = threading.Lock()

    @classmethod
    def train(cls, docs: Iterable[str], unknown_chars: str) -> CharTokenizer:
        chars: set[str] = set()
        for doc in docs:
            chars.update(doc)
        if not chars:
            raise UserError("tokenize.kind=char: the train split has no characters; check the prepare stage output")
        return cls(chars, unknown_chars)

    def _ids(self, text: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids, mask of the characters kept) of text; the mask is None when every character is kept."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        ids = self._table[np.minimum(codes, len(self._table) - 1)]
        unknown = ids < 0
        if not unknown.any():
            return ids.astype(np.uint32), None
        if self.unknown_chars == "error":
            ch = chr(codes[np.argmax(unknown)])
            raise UserError(
                f"character {ch!r} (U+{ord(ch):04X}) is absent from the train split and tokenize.unknown_chars is "
                "'error'; set it to 'skip' or 'unk' to allow such characters"
            )
        with self._lock:  # encode runs in several threads
            self._unknown += int(unknown.sum())
        if self.unknown_chars == "skip":
            return ids[~unknown].astype(np.uint32), ~unknown
        ids[unknown] = self.unk_id
        return ids.astype(np.uint32), None

    def encode(self, text: str) -> list[int]:
        return self._ids(text)[0].tolist()

    def _encode_documents(self, texts: list[str]) -> np.ndarray:
        # The whole chunk in a few numpy calls (per-document calls would be Python overhead under the GIL).
        ids, kept = self._ids("".join(texts))
        ends = np.cumsum([len(t) for t in texts], dtype=np.int64)  # len() counts code points, as the table does
        if kept is not None:
            ends = np.concatenate([[0], np.cumsum(kept)])[ends]
        return np.insert(ids, ends, self.eot_id)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.tokens[i] for i in as_list(ids))

    def settings(self) -> dict:
        return {"unknown_chars": self.unknown_chars, "unk_id": self.unk_id}

    def describe(self) -> dict:
        counted = {"skip": "unknown_chars_skipped", "unk": "unknown_chars_as_unk"}.get(self.unknown_chars)
        return {**super().describe(), **({counted: self._unknown} if counted else {})}

    def _save(self, folder: Path) -> None:
        write_text_atomic(folder / "vocab.json", json.dumps(self.tokens, ensure_ascii=False) + "\n")

    @classmethod
    def _load(cls, folder: Path, meta: dict) -> CharTokenizer:
        tokens = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        return cls(tokens[: meta["eot_id"]], meta["unknown_chars"])


# ------------------------------------------------------------------------------------------------- bpe


class BpeTokenizer(Tokenizer):
    """Byte-level BPE (GPT-2's scheme) trained on the train split with Hugging Face `tokenizers`."""

    kind = "bpe"
    parallel_inside = True

    def __init__(self, tok, requested_vocab_size: int | None = None):
        # Match special tokens in input as plain text (the ordinary-text contract); not saved to tokenizer.json.
        tok.encode_special_tokens = True
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eot_id = tok.token_to_id(EOT)
        self.requested_vocab_size = requested_vocab_size

    @classmethod
    def train(cls, docs: Iterable[str], vocab_size: int, min_frequency: int) -> BpeTokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator(docs, trainer=trainer)
        if tok.get_vocab_size() <= 257:  # only the bytes and EOT: nothing was read
            raise UserError("tokenize.kind=bpe: the train split is empty; check the prepare stage output")
        return cls(tok, vocab_size)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch releases the GIL and spreads the texts over tokenizers' own thread pool.
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(as_list(ids), skip_special_tokens=False)

    def settings(self) -> dict:
        return {"requested_vocab_size": self.requested_vocab_size}

    def _save(self, folder: Path) -> None:
        self.tok.save(str(folder / "tokenizer.json"))
        # Lets transformers' AutoTokenizer (and so tokenize.kind=hf) load this folder with EOS set.
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT,
                  "clean_up_tokenization_spaces": False}
        write_json_atomic(folder / "tokenizer_config.json", config)

    @classmethod
    def _load(cls, folder: Path, meta: dict) -> BpeTokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(folder / "tokenizer.json")), meta.get("requested_vocab_size"))


# -------------------------------------------------------------------------------------------------- hf


class HfTokenizer(Tokenizer):
    """A pretrained tokenizer through transformers' AutoTokenizer (a local folder or a hub id)."""

    kind = "hf"
    parallel_inside = True

    def __init__(self, pretrained: str, key: str = "tokenize.pretrained", add_bos: bool | str = "auto", parse_special: bool = True):
        from transformers import AutoTokenizer

        path = Path(pretrained).expanduser()
        if not path.is_dir() and (path.is_absolute() or pretrained.startswith((".", "~")) or pretrained.count("/") > 1):
            raise UserError(f"{key}: tokenizer folder {pretrained!r} {absent(path, folder=True)}")
        try:
            self.tok = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else pretrained, trust_remote_code=False)
        except (OSError, ValueError) as e:  # missing files, hub unreachable, malformed id
            raise UserError(
                f"{key}: could not load tokenizer {pretrained!r} ({str(e).splitlines()[0]}); use a local folder holding "
                "its tokenizer files, or a hub id that is cached (offline, set HF_HUB_OFFLINE=1 so the cache is used)"
            ) from e
        if self.tok.eos_token_id is None:
            raise UserError(f"{key}: tokenizer {pretrained!r} has no eos_token, which separates documents; set "
                            "eos_token in its tokenizer_config.json")
        self.pretrained = pretrained
        self.vocab_size = len(self.tok)
        self.eot_id = self.tok.eos_token_id
        self.parse_special = parse_special
        # auto: what the tokenizer does itself when it encodes a text with its special tokens (Llama, Gemma: a BOS).
        adds_bos = self.tok.bos_token_id is not None and self.tok("a").get("input_ids", [None])[0] == self.tok.bos_token_id
        self.add_bos = adds_bos if add_bos == "auto" else bool(add_bos)

    @property
    def bos_id(self) -> int:
        return self.tok.bos_token_id if self.tok.bos_token_id is not None else self.eot_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False, split_special_tokens=not self.parse_special, verbose=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        out = self.tok(texts, add_special_tokens=False, split_special_tokens=not self.parse_special, verbose=False)
        return out["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(as_list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def settings(self) -> dict:
        return {"pretrained": self.pretrained, "eot_token": self.tok.eos_token, "parse_special": self.parse_special}

    def _save(self, folder: Path) -> None:
        self.tok.save_pretrained(str(folder))

    @classmethod
    def _load(cls, folder: Path, meta: dict) -> HfTokenizer:
        tok = cls(str(folder), key=str(folder), add_bos=meta.get("add_bos", False), parse_special=meta.get("parse_special", False))
        tok.pretrained = meta.get("pretrained", str(folder))
        return tok


# ---------------------------------------------------------------------------------------------- build


KINDS: dict[str, type[Tokenizer]] = {c.kind: c for c in (TiktokenTokenizer, CharTokenizer, BpeTokenizer, HfTokenizer)}


def build_tokenizer(cfg: TokenizeConfig, train_docs: Callable[[], Iterable[str]]) -> Tokenizer:
    """Load (tiktoken, hf) or train (char, bpe) the tokenizer; train_docs() streams the train split afresh."""
    if cfg.kind == "hf":
        return HfTokenizer(cfg.pretrained, add_bos=cfg.add_bos, parse_special=cfg.parse_special)
    if cfg.pretrained:  # continued training: the tokenizer a gptpipe model was trained with, not a new one
        return model_tokenizer(cfg.pretrained, cfg.kind)
    if cfg.kind == "tiktoken":
        tok = TiktokenTokenizer(cfg.encoding)
    elif cfg.kind == "char":
        tok = CharTokenizer.train(train_docs(), cfg.unknown_chars)
    else:
        tok = BpeTokenizer.train(train_docs(), cfg.vocab_size, cfg.min_frequency)
    tok.add_bos = cfg.add_bos is True  # these kinds add none of their own: auto = no
    return tok


def model_tokenizer(model_folder: str, kind: str, key: str = "tokenize.pretrained") -> Tokenizer:
    """The tokenizer saved with a gptpipe checkpoint, run folder or export, which must be of this kind."""
    from pipeline.layout import CheckpointDir, ExportDir, saved_tokenizer

    folder = saved_tokenizer(model_folder)
    if folder is None:
        what = absent(Path(model_folder), folder=True) if not Path(model_folder).is_dir() else "holds no gptpipe tokenizer"
        raise UserError(f"{key}: {model_folder!r} {what}: with tokenize.kind={kind} it names a gptpipe checkpoint, run folder "
                        "or export whose tokenizer to reuse (a Hugging Face tokenizer is tokenize.kind=hf)")
    step, export = CheckpointDir(folder.parent), ExportDir(folder.parent)
    if folder == step.tokenizer:  # a step folder's: checked as a resume checks it
        problem = seal_problem(step.root, step.checksums, unlisted="*", under=folder.name)
        if problem:
            raise UserError(f"{key}: the checkpoint {step.root} is not intact: {problem}; name another step folder")
    elif export.checksums.is_file():  # a sealed export's (an unsealed folder, a hub download, reads as it is)
        problem = seal_problem(export.root, export.checksums, unlisted="*", under=folder.name)
        if problem:
            raise UserError(f"{key}: the exported model {export.root} is damaged: {problem}; export it again (rerun train)")
    tok = load_tokenizer(folder)
    if tok.kind != kind:
        raise UserError(f"{key}: the tokenizer in {model_folder} is of kind {tok.kind}, not tokenize.kind={kind}: set tokenize.kind={tok.kind}")
    return tok


def same_ids(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers map text to the same ids: the same kind and settings, and every id the same text."""
    return ids_difference(a, b) is None


def ids_difference(a: Tokenizer, b: Tokenizer, a_name: str = "the first", b_name: str = "the second") -> str | None:
    """What makes b's ids other than a's, in words ("both are char with 65 ids, but id 3 is 'c' in data/a and 'd' in
    data/b"), for a message that would otherwise read "(char, 65 ids) than (char, 65 ids)"; None when they map text
    to the same ids (the same kind and settings, and every id the same text)."""
    if (a.kind, a.vocab_size) != (b.kind, b.vocab_size):
        return f"{a.kind} with {a.vocab_size:,} ids in {a_name}, {b.kind} with {b.vocab_size:,} ids in {b_name}"
    both = f"both are {a.kind} with {a.vocab_size:,} ids"
    first, second = a.describe(), b.describe()
    for key in sorted(set(first) | set(second)):
        if key.startswith("unknown_chars_"):  # counts of the text encoded, not settings
            continue
        if first.get(key) != second.get(key):
            return f"{both}, but {key} is {first.get(key)!r} in {a_name} and {second.get(key)!r} in {b_name}"
    for i in range(a.vocab_size):
        if a.decode([i]) != b.decode([i]):
            return f"{both}, but id {i} is {a.decode([i])!r} in {a_name} and {b.decode([i])!r} in {b_name}"
    return None


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """A tokenizer saved by Tokenizer.save()."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise UserError(f"{meta_path} {absent(meta_path)}: not a tokenizer folder (run the tokenize stage)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        cls = KINDS[meta["kind"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path}: malformed tokenizer metadata ({type(e).__name__}: {e})") from None
    tok = cls._load(folder, meta)
    tok.add_bos = bool(meta.get("add_bos", False))
    if (tok.vocab_size, tok.eot_id) != (meta.get("vocab_size"), meta.get("eot_id")):
        raise UserError(f"{folder}: the tokenizer files give vocab_size={tok.vocab_size}, eot_id={tok.eot_id} but "
                        f"{META_FILE} says {meta.get('vocab_size')}, {meta.get('eot_id')}; rerun the tokenize stage")
    return tok
