"""Causal language models from Hugging Face transformers, built from scratch or loaded to fine-tune.

Nothing here knows about DeepSpeed: the engine wraps whatever this returns.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from pipeline.checkpoints.folder import checkpoint_weights
from pipeline.checkpoints.run import find_checkpoint
from pipeline.config.model import ModelConfig
from pipeline.config.train import TrainConfig
from pipeline.errors import UserError
from pipeline.files import absent, seal_problem
from pipeline.layout import ExportDir, saved_tokenizer
from pipeline.tokenize.tokenizers import ids_difference, load_tokenizer

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# A vocabulary padded to a multiple of 64 makes the embedding and output matmuls faster on GPUs; the extra ids
# never occur in the data, so training learns to give them no probability. A small vocabulary (characters) is
# padded to a multiple of 8 only: 65 characters padded to 128 would double the output layer's work for nothing.
VOCAB_MULTIPLE = 64
SMALL_VOCAB_MULTIPLE = 8


def padded_vocab(vocab_size: int, multiple: int | None = None) -> int:
    multiple = multiple or (VOCAB_MULTIPLE if vocab_size >= 1024 else SMALL_VOCAB_MULTIPLE)
    return math.ceil(vocab_size / multiple) * multiple


def scratch_config(cfg: ModelConfig, vocab_size: int, eot_id: int):
    """The transformers config of a model trained from scratch on a tokenizer of vocab_size ids."""
    n_layer, n_head, n_embd, block_size = cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size
    common = dict(vocab_size=padded_vocab(vocab_size), bos_token_id=eot_id, eos_token_id=eot_id, tie_word_embeddings=cfg.tie_embeddings)
    # Imported where used: transformers loads each architecture's module on first access (Llama's costs ~1.5 s).
    if cfg.arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            n_positions=block_size,
            n_inner=cfg.intermediate_size,  # null: GPT-2's own 4 * n_embd
            resid_pdrop=cfg.dropout or 0.0,
            embd_pdrop=cfg.dropout or 0.0,
            attn_pdrop=cfg.dropout or 0.0,
            # Exact GELU in one fused kernel, as nanoGPT; GPT-2's tanh approximation ("gelu_new") is six
            # element-wise ops forward and back, about a fifth of a small model's step on a CPU.
            activation_function="gelu",
            **common,
        )
    from transformers import LlamaConfig

    # Llama's MLP has three matrices, so 2/3 of GPT-2's 4x width keeps the parameter count comparable.
    intermediate = cfg.intermediate_size or 64 * math.ceil(4 * n_embd * 2 / 3 / 64)
    return LlamaConfig(
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=cfg.n_kv_head or n_head,
        hidden_size=n_embd,
        intermediate_size=intermediate,
        max_position_embeddings=block_size,
        attention_dropout=cfg.dropout or 0.0,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        **common,
    )


def build_model(cfg: ModelConfig, vocab_size: int, eot_id: int, precision: str = "fp32",
                activation_checkpointing: bool = False, shards: int = 1, attention: str = "sdpa") -> PreTrainedModel:
    """A fresh model (seed torch first for reproducible weights) or a loaded checkpoint, ready to train.

    A fresh model starts in fp32, so its initialisation does not depend on the precision (DeepSpeed keeps fp32
    master weights for bf16/fp16 anyway); a checkpoint loads in the training precision. shards: the processes a
    fresh model's weights are split over as it is built (ZeRO-3 under engine.model_init). attention: the kernel
    attention_kernel chose.
    """
    if cfg.is_scratch:
        config = scratch_config(cfg, vocab_size, eot_id)
        model = _with_kernel(lambda **kw: AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False, **kw), attention)
    elif (ckpt := init_checkpoint(cfg.init)) is not None:  # continued training from a gptpipe checkpoint
        model = model_from_config(ckpt.root, TORCH_DTYPES[precision], cfg.dropout, attention, cfg.trust_remote_code)
        model.load_state_dict(checkpoint_weights(ckpt))
    else:
        model = load_pretrained(cfg.init, TORCH_DTYPES[precision], cfg.trust_remote_code, dropout=cfg.dropout, attention=attention)
    if not cfg.is_scratch:
        max_positions = context_length(model.config)
        if max_positions and cfg.block_size > max_positions:
            raise UserError(f"model.block_size={cfg.block_size} is longer than {cfg.init}'s context of {max_positions} tokens")
        n_embeddings = model.get_input_embeddings().weight.shape[0]
        if vocab_size > n_embeddings:
            # The tokenizer has tokens the checkpoint has no rows for (added specials): give them rows.
            model.resize_token_embeddings(vocab_size, pad_to_multiple_of=VOCAB_MULTIPLE)
    if activation_checkpointing:
        # Recompute each block in backward; transformers 5 renamed the method (and its argument).
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def check_fits_in_memory(config, shards: int = 1) -> None:
    """UserError when a fresh model's fp32 weights alone (this process's share of them) would not fit in this
    machine's free memory: a shape such as n_layer=1024, n_embd=65536 is then one message, not an allocation
    failure or minutes of swapping. Call it before ZeRO-3's zero.Init: a meta-device model cannot be partitioned
    (Llama's rotary buffers fail there)."""
    import psutil

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        n = count_params(AutoModelForCausalLM.from_config(config, trust_remote_code=False))
    need, free = 4 * n / shards, psutil.virtual_memory().available
    if need > free:
        share = f"this process's 1/{shards} of their fp32 weights" if shards > 1 else "their fp32 weights alone"
        raise UserError(f"model.n_layer/n_head/n_embd describe {n / 1e9:,.1f}B parameters: {share} need"
                        f" {need / 1e9:,.1f} GB, and this machine has {free / 1e9:,.1f} GB free. Choose a smaller shape")


def init_checkpoint(init: str):
    """The gptpipe training checkpoint model.init names (a step folder, or a run folder's newest intact step), verified;
    None for an export, a Hugging Face folder or a hub id, which load with from_pretrained."""
    return find_checkpoint(init, "model.init") if init != "scratch" and Path(init).is_dir() else None


def init_config_dir(init: str) -> str:
    """Where model.init's config.json is: a checkpoint's own folder, else init itself (a folder or hub id); a
    checkpoint or an export is verified first."""
    ckpt = init_checkpoint(init)
    if ckpt is None and Path(init).is_dir():
        check_export(Path(init), "model.init")
    return str(ckpt.root) if ckpt is not None else init


def check_vocabulary(model: PreTrainedModel, init: str, tokenizer) -> None:
    """A pretrained model must speak the tokenizer's ids. A model gptpipe trained carries its tokenizer: the tokens
    must come from that one. An hf tokenizer is the checkpoint's own (its added tokens got rows in build_model);
    tiktoken's gpt2 encoding fits GPT-2 checkpoints only, so check that it is one."""
    if init == "scratch":
        return
    own = saved_tokenizer(init)
    if own is not None:
        saved = load_tokenizer(own)
        difference = ids_difference(saved, tokenizer, "the model's tokenizer", "the tokens here")
        if difference:
            raise UserError(f"model.init={init!r} was trained on other token ids ({difference}): tokenize with its tokenizer "
                            f"(tokenize.kind={saved.kind}, tokenize.pretrained={init!r}), then train")
        return
    if tokenizer.kind == "hf":
        return
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < tokenizer.vocab_size or model.config.eos_token_id != tokenizer.eot_id:
        raise UserError(f"model.init={init!r} does not use the ids of tokenize.kind={tokenizer.kind} ({rows} embedding rows, end-of-text"
                        f" {model.config.eos_token_id}; the tokenizer has {tokenizer.vocab_size} ids, end-of-text {tokenizer.eot_id}):"
                        f" use tokenize.kind=hf with tokenize.pretrained={init!r}")


def export_dtype(choice: str, cfg: ModelConfig) -> torch.dtype:
    """train.export_dtype resolved: auto = fp32 for a model trained from scratch, the checkpoint's own dtype for a fine-tune."""
    if choice != "auto":
        return TORCH_DTYPES[choice]
    if cfg.is_scratch:
        return torch.float32
    config = AutoConfig.from_pretrained(init_config_dir(cfg.init), trust_remote_code=cfg.trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def model_from_config(config_dir: str | Path, dtype: torch.dtype = torch.float32, dropout: float | None = None,
                      attention: str = "sdpa", trust_remote_code: bool = False, key: str = "model.init") -> PreTrainedModel:
    """A model with random weights from the config.json in config_dir (a checkpoint's), for loading weights into;
    dropout, when given, replaces every dropout probability of the config. A config naming modelling code of its
    own (an auto_map) is refused unless trust_remote_code (model.trust_remote_code)."""
    try:
        config = set_dropout(AutoConfig.from_pretrained(config_dir, trust_remote_code=trust_remote_code), dropout)
        return _with_kernel(lambda **kw: AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code, **kw), attention)
    except ValueError as e:
        if ships_code(e):
            raise code_refused(key, config_dir) from None
        raise


# The config keys that hold a dropout probability, by architecture family (GPT-2's three; Llama, Gemma, Mistral
# and Qwen's attention_dropout; BERT-style names some causal LMs reuse).
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout", "hidden_dropout_prob",
                "attention_probs_dropout_prob", "embed_dropout", "resid_dropout", "dropout")


def set_dropout(config, dropout: float | None):
    """config with every dropout probability it has set to dropout (None: unchanged)."""
    if dropout is not None:
        for attr in DROPOUT_KEYS:
            if isinstance(getattr(config, attr, None), (int, float)):
                setattr(config, attr, dropout)
    return config


def load_pretrained(name: str, dtype: torch.dtype, trust_remote_code: bool = False, key: str = "model.init",
                    dropout: float | None = None, attention: str = "sdpa") -> PreTrainedModel:
    """AutoModelForCausalLM.from_pretrained with a clear message when the checkpoint can't be had.

    A gptpipe export is verified against its checksums first (a folder without them, e.g. a download, loads as it
    is). dropout, when given, replaces every dropout probability the checkpoint's config has.
    """
    from safetensors import SafetensorError

    folder = Path(name)
    if folder.is_dir():
        check_export(folder, key)
        config_file = ExportDir(folder).model_config
        if not config_file.is_file():
            what = f"its config.json {absent(config_file)}" if config_file.exists() else "it has no config.json"
            raise UserError(f"{key}={name!r}: cannot load this folder ({what}; save a model there with save_pretrained)")
    elif looks_like_path(name):
        raise UserError(f"{key}={name!r}: not found (no such folder; a hub id has the form name or owner/name)")
    try:
        config = set_dropout(AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code), dropout)
        return _with_kernel(lambda **kw: AutoModelForCausalLM.from_pretrained(
            name, config=config, dtype=dtype, trust_remote_code=trust_remote_code, **kw), attention)
    except OSError as e:
        reason = str(e).splitlines()[0]
        if folder.exists():
            raise UserError(f"{key}={name!r}: cannot load this folder ({reason})") from None
        offline = " HF_HUB_OFFLINE is set, so only the cache is read." if huggingface_offline() else " Offline?"
        raise UserError(
            f"{key}={name!r}: no folder of this name here, and as a hub id it cannot be loaded ({reason}).{offline} Use a"
            " local folder saved with save_pretrained, or download it once with network access (HF_HOME caches it)."
        ) from None
    except pickle.UnpicklingError as e:  # a pickle weights file (pytorch_model.bin) that would run code: torch refused it
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        which = weights_files(folder, "*.bin", "its pickle weights file")
        raise UserError(f"{key}={name!r}: refused to load {which}: it holds {found.group(1) if found else 'an object'}, which loading"
                        " would run as code (none ran). Use safetensors weights (model.safetensors), or re-save a file you trust") from None
    except SafetensorError as e:  # a damaged or truncated weights file that no checksum covered (not an export's)
        which = weights_files(folder, "*.safetensors", "its safetensors weights")
        raise UserError(f"{key}={name!r}: {which} is damaged or cut short ({str(e).splitlines()[0]}): copy or"
                        " download the model again") from None
    except ValueError as e:
        if ships_code(e):
            raise code_refused(key, name) from None
        raise UserError(f"{key}={name!r}: cannot load this model ({str(e).splitlines()[0]})") from None


def check_export(folder: Path, key: str) -> None:
    """UserError naming the file when folder is a gptpipe export whose files differ from its checksums (a folder
    without them, a Hugging Face download, is not checked)."""
    export = ExportDir(folder)
    if export.checksums.is_file():
        problem = seal_problem(export.root, export.checksums, unlisted="*")
        if problem:
            raise UserError(f"{key}: the exported model {folder} is damaged: {problem}. Nothing was loaded: export it"
                            " again (rerun train: it exports from its last checkpoint) or restore it (dvc checkout)")


def looks_like_path(name: str) -> bool:
    """A name that can only be a path, never a hub id (name or owner/name)."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1


def huggingface_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def weights_files(folder: Path, pattern: str, otherwise: str) -> str:
    files = sorted(p.name for p in folder.glob(pattern)) if folder.is_dir() else []
    return (files[0] if len(files) == 1 else f"one of {', '.join(files)}") if files else otherwise


def ships_code(e: ValueError) -> bool:
    """Whether transformers refused a folder or hub id because it names modelling code (an auto_map) to run."""
    return "trust_remote_code" in str(e) or "custom code" in str(e)


def code_refused(key: str, name: str | Path) -> UserError:
    return UserError(f"{key}={str(name)!r} ships its own modelling code (an auto_map in its config.json), which gptpipe runs"
                     " only with model.trust_remote_code=true: none of it ran. Set that if you trust the code")


# train.attention's choices: transformers' attn_implementation names.
FLASH = "flash_attention_2"


def attention_kernel(choice: str, document_mask: bool, precision: str, cuda: bool | None = None,
                     flash_installed: bool | None = None) -> str:
    """train.attention resolved to a transformers attn_implementation, or UserError when the choice cannot run here.

    auto is SDPA (PyTorch picks its flash kernel for a plain causal mask on a GPU), except for train.document_mask on
    a CUDA GPU in bf16/fp16 with the flash-attn package installed: then flash-attention's variable-length kernel, which
    skips the attention between documents instead of masking it (SDPA with a block-diagonal mask falls back to its
    memory-efficient kernel and computes every pair). cuda and flash_installed default to this machine's.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if flash_installed is None:
        import importlib.util

        flash_installed = importlib.util.find_spec("flash_attn") is not None
    half = precision in ("bf16", "fp16")
    if choice == "auto":
        return FLASH if document_mask and cuda and half and flash_installed else "sdpa"
    if choice == FLASH:
        missing = [why for ok, why in ((cuda, "a CUDA GPU"), (flash_installed, "the flash-attn package (pip install flash-attn)"),
                                       (half, f"train.precision bf16 or fp16 (it is {precision})")) if not ok]
        if missing:
            raise UserError(f"train.attention={FLASH} needs {' and '.join(missing)}: set train.attention=auto to use SDPA")
    return choice


def _with_kernel(make, attention: str = "sdpa"):
    """make(attn_implementation=attention); for SDPA, make() for architectures without it (their own attention)."""
    try:
        return make(attn_implementation=attention)
    except (ValueError, ImportError) as e:
        if attention == "sdpa" and "sdpa" in str(e).lower():
            return make()
        if attention != "sdpa":
            raise UserError(f"train.attention={attention}: {str(e).splitlines()[0]}") from None
        raise


def context_length(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None

def model_context(model) -> int | None:
    """The longest input the model takes (its position count), or None when unlimited."""
    return context_length(model.config)



def count_params(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once); whole ones, also when ZeRO-3 has partitioned them."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in {id(p): p for p in model.parameters()}.values())


def flops_per_token(model: PreTrainedModel, n_params: int, block_size: int) -> float:
    """Training FLOPs per token: 6N for the matmuls with weights plus attention's 12 * L * C * T (PaLM, appendix B)."""
    c = model.config
    n_layer = getattr(c, "num_hidden_layers", None) or c.n_layer
    n_embd = getattr(c, "hidden_size", None) or c.n_embd
    return 6 * n_params + 12 * n_layer * n_embd * block_size


def inference_dtype(train: TrainConfig) -> torch.dtype:
    """What evaluate and sample run in: the training precision on a GPU; fp32 on a CPU, where bf16 gains little
    outside matmuls and changes the numbers."""
    if torch.cuda.is_available() and train.precision != "fp32":
        return torch.bfloat16 if train.precision == "bf16" else torch.float16
    return torch.float32
