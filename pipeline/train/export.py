"""The trained model as a standard Hugging Face folder that loads without gptpipe, sealed with its checksums."""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from pipeline.checkpoints.state import write_export_info
from pipeline.config.all import Params
from pipeline.errors import UserError
from pipeline.files import building_dir, seal, write_failure
from pipeline.infra.deepspeed import full_state_dict
from pipeline.infra.distributed import Dist, any_rank
from pipeline.layout import ExportDir
from pipeline.tokenize.tokenizers import Tokenizer


def export_model(engine, p: Params, info: dict, dist: Dist, tokenizer: Tokenizer, dtype: torch.dtype) -> None:
    """Consolidate the engine's weights in dtype (ZeRO-3 included; call on every rank), write train.export_dir on rank 0.

    info (the step, val loss and why these weights) goes into gptpipe.json. A failed write (a full disk) leaves
    the previous export in place and ends every rank with one message.
    """
    weights = full_state_dict(engine, dtype)
    failure = None
    if dist.is_main:
        try:
            write_hf_folder(engine.module, weights, p, info, tokenizer, dtype)
        except Exception as e:  # noqa: BLE001 - narrowed by write_failure: anything else re-raises unchanged
            failure = write_failure(e, p.train.export_dir)
            if failure is None:
                raise
    if any_rank(failure is not None, dist.device):
        raise UserError(f"train: {failure or 'rank 0 could not write the export'} while exporting to train.export_dir; the"
                        " previous export (if any) is unchanged and the last checkpoint is complete: rerun to export")


def write_hf_folder(model, weights: dict, p: Params, info: dict, tokenizer: Tokenizer, dtype: torch.dtype) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one small folder: no "Writing model shards" bar in the train log
    bos = tokenizer.bos_id if tokenizer.add_bos else tokenizer.eot_id
    with building_dir(p.train.export_dir, "train.export_dir") as tmp:
        out = ExportDir(tmp)
        model.config.bos_token_id, model.config.eos_token_id = bos, tokenizer.eot_id
        model.config.dtype = dtype  # what the weights are, whatever precision trained them
        model.save_pretrained(out.root, state_dict=weights, safe_serialization=True)
        GenerationConfig(bos_token_id=bos, eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.eot_id).save_pretrained(out.root)
        tokenizer.save_for_transformers(out.root)  # bpe and hf: AutoTokenizer reads the folder
        tokenizer.save(out.tokenizer)  # every kind, char and tiktoken too: what `gptpipe sample` decodes with
        write_export_info(out.info, {**info, "dtype": str(dtype).removeprefix("torch.")}, p.model_dump())
        seal(out.root, out.checksums)  # last, as a step folder's: gptpipe verifies the export wherever it reads it
