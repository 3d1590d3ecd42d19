"""The trained model as a standard Hugging Face folder that loads without gptpipe."""

from __future__ import annotations

from transformers import GenerationConfig

from pipeline import engine as ds
from pipeline.config import Params
from pipeline.files import building_dir, write_json_atomic
from pipeline.layout import ExportDir
from pipeline.tokenizers import Tokenizer


def export_model(engine, p: Params, state: dict, dist: ds.Dist, tokenizer: Tokenizer) -> None:
    """Consolidate the weights (ZeRO-3 included; call on every rank) and write train.export_dir on rank 0."""
    weights = ds.full_state_dict(engine)
    if dist.is_main:
        write_hf_folder(engine.module, weights, p, state, tokenizer)
    ds.barrier()


def write_hf_folder(model, weights: dict, p: Params, state: dict, tokenizer: Tokenizer) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one small folder: no "Writing model shards" bar in the train log
    with building_dir(p.train.export_dir) as tmp:
        out = ExportDir(tmp)
        model.config.bos_token_id = model.config.eos_token_id = tokenizer.eot_id
        model.save_pretrained(out.root, state_dict=weights, safe_serialization=True)
        GenerationConfig(bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.eot_id).save_pretrained(out.root)
        tokenizer.save_for_transformers(out.root)  # bpe and hf: AutoTokenizer reads the folder
        tokenizer.save(out.tokenizer)  # every kind, char and tiktoken too: what `gptpipe sample` decodes with
        info = {"step": state["step"], "tokens_seen": state["tokens_seen"], "val_loss": state["val_loss"], "params": p.model_dump()}
        write_json_atomic(out.info, info)
