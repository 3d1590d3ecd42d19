"""tokenize's params: the tokenizer and the token files."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import BIG, Section, check


class TokenizeConfig(Section):
    """tokenize: documents -> a tokenizer and memory-mappable token files."""

    kind: Literal["tiktoken", "char", "bpe", "hf", "import"] = Field(
        "bpe", description="tiktoken (OpenAI BPE), char (characters of the train split), bpe (byte-level BPE trained here), hf, or import (ids made elsewhere: import_dirs)"
    )
    import_dirs: list[str] = Field(
        default_factory=list, description="import only: nanoGPT data folders (train.bin, val.bin; meta.pkl for char data, else gpt2 ids) or gptpipe token folders, concatenated split by split (one tokenizer); keep them under data/raw"
    )
    import_encoding: Literal["auto", "gpt2"] = Field(
        "auto", description="import only: the ids of a nanoGPT folder without meta.pkl; auto = tiktoken's gpt2, refused when every id is below 256 (char data that lost its meta.pkl); gpt2 = gpt2 ids even then"
    )
    encoding: str = Field("gpt2", min_length=1, description="tiktoken only: encoding name (gpt2, r50k_base, cl100k_base, ...)")
    vocab_size: int = Field(4096, ge=260, le=1_000_000, description="bpe only: vocabulary size to train, special tokens included")
    min_frequency: int = Field(2, ge=1, le=BIG, description="bpe only: minimum pair count for a merge")
    pretrained: str | None = Field(
        None, description="hf: tokenizer folder or hub id (use the model's own for fine-tuning); other kinds: a gptpipe checkpoint, run folder or export whose tokenizer to reuse instead of training one (continued training)"
    )
    add_bos: bool | Literal["auto"] = Field(
        "auto", description="start every document with the tokenizer's BOS token; auto = when the tokenizer adds one itself (Llama, Gemma)"
    )
    parse_special: bool = Field(
        True, description="hf only: special tokens written in the text (<sep>, <|endoftext|>) become their ids, as AutoTokenizer does; false for untrusted text"
    )
    unknown_chars: Literal["error", "skip", "unk"] = Field(
        "unk", description="char only, for characters not in the train split: error, skip them, or map to an <unk> token"
    )
    workers: int = Field(
        0, ge=0, le=1024, description="threads encoding tiktoken/char chunks; 0 = one per usable core (bpe/hf use tokenizers' own pool)"
    )
    chunk_bytes: int = Field(1 << 20, ge=1024, le=1 << 31, description="text per unit of parallel work; bounds memory whatever the corpus size")
    shard_tokens: int = Field(
        100_000_000, ge=1024, le=1 << 40, description="ids per token file (train-00000.bin, ...): DVC hashes each, and an interrupted tokenize keeps the finished ones"
    )
    out_dir: str = Field("data/tokens", min_length=1, description="where the token shards, meta.json and tokenizer/ go")
    metrics_file: str = Field(
        "reports/tokenize.json", min_length=1, description="throughput of the run (kept out of out_dir, so that stays a pure function of its inputs)"
    )

    @model_validator(mode="after")
    def _kind_needs(self):
        if self.kind == "hf" and not self.pretrained:
            check([("pretrained", "required when kind is 'hf' (a tokenizer folder or hub id)")])
        if self.kind == "import" and not self.import_dirs:
            check([("import_dirs", "required when kind is 'import': the nanoGPT data or token folders to import")])
        if self.import_dirs and self.kind != "import":
            check([("import_dirs", f"set with tokenize.kind={self.kind}: it is read with kind import only")])
        if self.import_encoding != "auto" and self.kind != "import":
            check([("import_encoding", f"set with tokenize.kind={self.kind}: it is read with kind import only")])
        return self
