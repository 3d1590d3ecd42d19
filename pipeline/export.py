"""The trained model as a standard Hugging Face folder that loads without gptpipe."""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import GenerationConfig

from pipeline import engine as ds
from pipeline.config import Params
from pipeline.files import building_dir, write_json_atomic

# Tokenizer kinds whose gptpipe folder is also a transformers tokenizer folder (char and tiktoken are not).
HF_LOADABLE = ("bpe", "hf")


def export_model(engine, p: Params, state: dict, dist: ds.Dist) -> None:
    """Consolidate the weights (ZeRO-3 included; call on every rank) and write train.export_dir on rank 0."""
    weights = ds.full_state_dict(engine)
    if dist.is_main:
        write_hf_folder(engine.module, weights, p, state)
    ds.barrier()


def write_hf_folder(model, weights: dict, p: Params, state: dict) -> None:
    from pipeline.tokenizers import META_FILE, load_tokenizer

    tokenizer_dir = Path(p.tokenize.out_dir) / "tokenizer"
    tokenizer = load_tokenizer(tokenizer_dir)
    with building_dir(p.train.export_dir) as out:
        model.config.bos_token_id = model.config.eos_token_id = tokenizer.eot_id
        model.save_pretrained(out, state_dict=weights, safe_serialization=True)
        GenerationConfig(bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.eot_id).save_pretrained(out)
        if tokenizer.kind in HF_LOADABLE:
            # Their saved folders are already what AutoTokenizer reads.
            for f in tokenizer_dir.iterdir():
                if f.is_file() and f.name != META_FILE:
                    shutil.copy2(f, out / f.name)
        # gptpipe's own tokenizer folder, so `gptpipe sample` decodes every kind (char and tiktoken too).
        shutil.copytree(tokenizer_dir, out / "gptpipe_tokenizer")
        write_json_atomic(out / "gptpipe.json", {"step": state["step"], "tokens_seen": state["tokens_seen"], "val_loss": state["val_loss"], "params": p.model_dump()})
