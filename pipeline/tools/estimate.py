"""The one parameter and memory model of the tools: the model's shape built as training builds it, and the bytes its
training state takes, per process (`gptpipe plan`) and in a checkpoint (`gptpipe doctor`'s disk check).

The memory estimate counts what DeepSpeed and transformers hold for one process:
- weights, gradients and optimizer state: fp32 training keeps 4 + 4 bytes a parameter and AdamW's two moments
  (8 bytes; Muon's one momentum, 4, on its matrices); bf16/fp16 keep 2 + 2 bytes plus fp32 master weights and
  moments (4 + 8), the ZeRO paper's 16 bytes. ZeRO 1 splits the optimizer state over the processes, ZeRO 2 the
  gradients too, ZeRO 3 the weights too; offload moves the optimizer state (and with ZeRO 3 the weights) to CPU memory.
- activations of one micro batch kept for backward: per layer about 17 hidden-sized tensors per token for GPT-2
  (Korthikanti et al. 2022, "Reducing Activation Recomputation", with fused attention: no T x T scores) and
  the Llama equivalent; with activation checkpointing only each layer's input, plus one layer recomputed; and the
  logits, which transformers upcasts to fp32 for the loss (the logits, their fp32 copy and the loss's gradient:
  three vocabulary-wide tensors per token).
A checkpoint holds the weights and the optimizer state (masters and moments) of every process.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.all import Params
from pipeline.errors import UserError
from pipeline.layout import TokensDir


@dataclass
class Shape:
    """The model as the estimate needs it."""

    n_params: int
    n_hidden: int  # parameters in the 2-D hidden matrices (Muon's half)
    n_layer: int
    n_embd: int
    n_inner: int  # MLP width
    vocab: int
    arch: str
    flops_per_token: float


def tokenized(p: Params) -> dict | None:
    """The tokenize stage's meta.json (its keys checked by its one reader), or None before the data is tokenized."""
    from pipeline.tokens import read_meta

    return read_meta(p.tokenize.out_dir) if TokensDir(p.tokenize.out_dir).meta.is_file() else None


def vocabulary(p: Params, meta: dict | None) -> tuple[int, str | None]:
    """The tokenizer's vocabulary size: from the tokenized data when it exists, else from tokenize.* (and a note)."""
    if meta is not None:
        return meta["vocab_size"], None
    t = p.tokenize
    if t.kind == "bpe":
        return t.vocab_size, None
    if t.kind == "tiktoken":
        import tiktoken

        if t.encoding not in tiktoken.list_encoding_names():
            raise UserError(f"tokenize.encoding: unknown tiktoken encoding {t.encoding!r}; known: "
                            f"{', '.join(tiktoken.list_encoding_names())}")
        try:
            return tiktoken.get_encoding(t.encoding).n_vocab, None
        except (OSError, ValueError, ImportError) as e:  # fetching: requests errors, a hash mismatch, blobfile missing
            raise UserError(f"tokenize.encoding: tiktoken encoding {t.encoding!r} could not be loaded "
                            f"({type(e).__name__}: {first_line(e)}); set TIKTOKEN_CACHE_DIR to a folder holding its files") from None
    if t.kind == "hf":
        from transformers import AutoTokenizer

        try:
            return len(AutoTokenizer.from_pretrained(t.pretrained, trust_remote_code=False)), None
        except (OSError, ValueError) as e:  # missing files, hub unreachable, malformed id, remote code refused
            raise UserError(f"tokenize.pretrained: could not load tokenizer {t.pretrained!r} ({first_line(e)}); use a "
                            "local folder holding its files, or a cached hub id (offline: HF_HUB_OFFLINE=1)") from None
    return 256, f"{p.tokenize.out_dir} is not tokenized yet: a character vocabulary of 256 assumed"


def first_line(e: Exception) -> str:
    line = (str(e).splitlines() or [""])[0]
    return line if len(line) <= 120 else line[:120] + "..."


def estimated_shape(p: Params, meta: dict | None) -> tuple[Shape, str | None]:
    """The model's shape and a note on its vocabulary; the tokenizer is asked only for a model trained from scratch (a
    fine-tuned one keeps its own vocabulary)."""
    vocab, note = vocabulary(p, meta) if p.model.is_scratch else (0, None)
    return model_shape(p, vocab), note


def model_shape(p: Params, vocab: int) -> Shape:
    """The model's shapes and parameter counts, built on the meta device (no memory, no weights read); vocab is the
    tokenizer's, for a model trained from scratch."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.model.build import count_params, flops_per_token, init_config_dir, scratch_config
    from pipeline.train.optimizer import hidden_matrices

    m = p.model
    if m.is_scratch:
        config = scratch_config(m, vocab, 0)
    else:
        from huggingface_hub.errors import StrictDataclassError

        try:
            config = AutoConfig.from_pretrained(init_config_dir(m.init), trust_remote_code=m.trust_remote_code)
        # Missing or malformed JSON (OSError), no or an unknown model_type (ValueError), a key of the wrong type.
        except (OSError, ValueError, StrictDataclassError) as e:
            raise UserError(f"model.init={m.init!r}: its config.json could not be read ({first_line(e)})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code)
    n_params = count_params(model)
    hidden = hidden_matrices(model)
    named = dict(model.named_parameters())
    c = model.config
    n_layer = getattr(c, "num_hidden_layers", None) or c.n_layer
    n_embd = getattr(c, "hidden_size", None) or c.n_embd
    n_inner = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * n_embd
    return Shape(n_params=n_params, n_hidden=sum(named[n].numel() for n in hidden), n_layer=n_layer, n_embd=n_embd,
                 n_inner=n_inner, vocab=model.get_output_embeddings().weight.shape[0], arch=c.model_type,
                 flops_per_token=flops_per_token(model, n_params, m.block_size))


def state_bytes(p: Params, s: Shape) -> dict[str, float]:
    """Bytes of the whole model's weights, gradients and optimizer state, before ZeRO splits them over processes."""
    t, n = p.train, s.n_params
    low = t.precision in ("bf16", "fp16")
    weight_bytes, grad_bytes = (2, 2) if low else (4, 4)
    # Optimizer state: AdamW's two fp32 moments; with muon one momentum on the hidden matrices; plus fp32 masters.
    state = 8 * n if t.optimizer == "adamw" else 4 * s.n_hidden + 8 * (n - s.n_hidden)
    state += 4 * n if low else 0
    return {"weights": weight_bytes * n, "gradients": grad_bytes * n, "optimizer state": state}


# The ZeRO stage from which each part is split over the processes.
ZERO_SPLITS = {"weights": 3, "gradients": 2, "optimizer state": 1}


def memory_per_process(p: Params, s: Shape, processes: int) -> tuple[dict[str, float], float]:
    """(device bytes per process by part, bytes per process moved to CPU memory by offload); see the module doc."""
    t = p.train
    parts = {part: b / (processes if t.zero_stage >= ZERO_SPLITS[part] else 1) for part, b in state_bytes(p, s).items()}
    offloaded = 0.0
    if t.offload_optimizer:
        offloaded += parts["optimizer state"]
        parts["optimizer state"] = 0.0
    if t.offload_params:
        offloaded += parts["weights"]
        parts["weights"] = 0.0
    parts["activations"] = activation_bytes(p, s)
    return parts, offloaded


def checkpoint_bytes(p: Params, s: Shape) -> float:
    """What one checkpoint of the run holds on disk, over all its processes: the weights and the optimizer state.
    Under ZeRO an fp32 run's optimizer keeps (and saves) its own fp32 copy of the weights too: 16 bytes a parameter
    with AdamW, against 12 without ZeRO (measured on DeepSpeed 0.19's files)."""
    state = state_bytes(p, s)
    fp32_copy = 4 * s.n_params if p.train.precision == "fp32" and p.train.zero_stage >= 1 else 0
    return state["weights"] + state["optimizer state"] + fp32_copy


def activation_bytes(p: Params, s: Shape) -> float:
    """What one micro batch's forward keeps for its backward pass, at its largest (the loss's backward)."""
    t, m = p.train, p.model
    tokens = t.micro_batch_size * m.block_size
    element = 2 if t.precision in ("bf16", "fp16") else 4
    h, inner = s.n_embd, s.n_inner
    if s.arch == "llama":
        per_layer = 10 * h + 4 * inner  # norms, q k v (+ rotated), attention out, o, norm; gate, up, act, product
    else:
        per_layer = 9 * h + 2 * inner  # 17 hidden-sized tensors at GPT-2's 4x MLP
    if t.activation_checkpointing:
        layers = h * s.n_layer + per_layer  # each layer's input, and one layer recomputed at a time
    else:
        layers = per_layer * s.n_layer
    logits = 3 * s.vocab * 4  # logits, their fp32 copy for the loss, and its gradient (fp32)
    return tokens * (element * (layers + 2 * h) + logits)
