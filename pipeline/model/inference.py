"""Loading a trained model for inference, whatever the folder: an export, a training checkpoint or run folder, any
Hugging Face causal-LM folder. evaluate and sample both come here."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pipeline.checkpoints.folder import checkpoint_weights
from pipeline.checkpoints.run import find_checkpoint
from pipeline.errors import UserError
from pipeline.files import absent
from pipeline.infra.distributed import default_device
from pipeline.layout import ExportDir
from pipeline.model.build import load_pretrained, model_from_config
from pipeline.tokenize.tokenizers import HfTokenizer, Tokenizer, load_tokenizer

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_for_inference(source: str | Path, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                       key: str = "evaluate.model_dir", attention: str = "sdpa",
                       trust_remote_code: bool = False) -> tuple[torch.nn.Module, Tokenizer]:
    """(model in eval mode on device, its tokenizer); `key` names the param that chose source, for errors;
    attention: the kernel (build.attention_kernel's choice); trust_remote_code: model.trust_remote_code (else a
    model naming modelling code of its own is refused, its code never run).

    source is a local folder, or a hub id (downloaded once, or read from the cache offline).

    A training checkpoint (run-*/step-*, or a run folder for its latest) is rebuilt from the config and tokenizer
    it carries; an export (verified against its checksums) or any Hugging Face folder loads with from_pretrained,
    with gptpipe's own tokenizer from gptpipe_tokenizer/ when present (every kind), else the folder's transformers tokenizer.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the stage shows its own progress
    folder = Path(source)
    ckpt = find_checkpoint(folder, key)
    if ckpt is not None:
        for needed in (ckpt.model_config, ckpt.tokenizer):
            if not needed.exists():
                raise UserError(f"{key}: {ckpt.root} has no {needed.name} (a checkpoint of an older gptpipe?); "
                                "point at the exported model folder instead")
        model = model_from_config(ckpt.root, dtype, attention=attention, trust_remote_code=trust_remote_code, key=key)
        model.load_state_dict(checkpoint_weights(ckpt))
        tokenizer = load_tokenizer(ckpt.tokenizer)
    elif ExportDir(folder).model_config.exists() or ExportDir(folder).checksums.is_file():  # checked in load_pretrained
        model = load_pretrained(str(folder), dtype, trust_remote_code, key=key, attention=attention)
        own = ExportDir(folder).tokenizer
        tokenizer = load_tokenizer(own) if own.is_dir() else HfTokenizer(str(folder), key=key)
    elif not folder.exists() and HUB_ID.match(str(source)):  # e.g. gpt2, google/gemma-3-270m: the hub or its cache
        model = load_pretrained(str(source), dtype, trust_remote_code, key=key, attention=attention)
        tokenizer = HfTokenizer(str(source), key=key)
    else:
        what = absent(folder, folder=True) if not folder.is_dir() else "is not a model folder (no config.json)"
        raise UserError(f"{key}: {folder} {what}; run the train stage first (dvc repro train), or point {key} at a "
                        "Hugging Face model folder or a training checkpoint")
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer.vocab_size > rows:
        raise UserError(f"{key}: the tokenizer in {folder} has {tokenizer.vocab_size} ids but the model only {rows} "
                        "embedding rows: the folder mixes two models")
    return model.to(device or default_device()).eval(), tokenizer
