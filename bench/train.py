"""Training step throughput: gptpipe's step against a plain PyTorch loop on the same model, and against a minimal
GPT written the way nanoGPT's is, all in this process on the same batches and precision.

For each of ZeRO 0 and 2, fp32 and bf16, torch.compile off and on:
  - gptpipe: the real `training.setup` and `fit` (DeepSpeed engine, the loop's own step), timed over --steps
    steps after warm-up steps (compilation included in the warm-up);
  - plain loop: the same Hugging Face model and batches, torch's fused AdamW, clip_grad_norm_, bf16 by autocast;
  - minimal GPT: bench/minimal.py's model (no biases, exact GELU, fused attention) in the same plain loop.
tokens/s, the ratios (gptpipe / plain is the engine's overhead), and MFU against this machine's matmul peak,
measured here first (pipeline.infra.hardware.calibrate, as training does) (fp32 and bf16: it differs from CPU to CPU). A dated table goes to docs/benchmarks.md.

    python bench/train.py [--steps 100] [--quick]    # --quick: ZeRO 0, fp32 and bf16, compile off

On a GPU, --preset gpt2-124m measures GPT-2 small (12 layers, 768 wide, block 1024, GPT-2's tokenizer) in bf16
with ZeRO 1 and 2, compile off and on, attention through SDPA (flash), MFU against the GPU's dense bf16 peak:

    python bench/train.py --preset gpt2-124m [--batch 16] [--steps 50]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minimal import GPT, GPTConfig, adamw  # noqa: E402
from record import append_row  # noqa: E402

from pipeline.infra.distributed import init_distributed

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
PRESETS = {  # model, micro batch, tokenizer
    "nanogpt-cpu": ({"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "dropout": 0.0}, 12, "char"),  # nanoGPT's CPU settings
    "gpt2-124m": ({"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "dropout": 0.0}, 16, "tiktoken"),
}
MODEL, BATCH, TOKENIZER = PRESETS["nanogpt-cpu"]  # main() sets the chosen preset
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_tokens(folder: Path) -> Path:
    from pipeline.config.prepare import PrepareConfig
    from pipeline.config.tokenize import TokenizeConfig
    from pipeline.prepare.stage import prepare_corpus
    from pipeline.tokenize.stage import tokenize_corpus

    prepare_corpus(PrepareConfig.model_validate({"source": {"kind": "files", "path": str(TEXT)}, "split": "tail", "dedup": False,
                                                "out_dir": str(folder / "prepared")}))
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TEXT.parent / "tiktoken_cache"))
    tokenize_corpus(TokenizeConfig(kind=TOKENIZER, out_dir=str(folder / "tokens")), folder / "prepared")
    return folder / "tokens"


def gptpipe_step(tokens: Path, folder: Path, zero: int, precision: str, compile_: bool, warmup: int, steps: int) -> tuple[float, float]:
    """(tokens/s, FLOPs per token) of the pipeline's own loop, eval and saving out of the way."""
    from pipeline import params
    from pipeline.output import silent
    from pipeline.train.loop import fit, setup

    raw = {"tokenize": {"kind": TOKENIZER, "out_dir": str(tokens)}, "model": MODEL,
           "train": {"max_steps": 10**6, "micro_batch_size": BATCH, "lr": 1e-3, "warmup_steps": 10, "zero_stage": zero, "precision": precision,
                     "compile": compile_, "log_interval": 10**6, "eval_interval": 10**6, "save_interval": 10**6, "resume": "never",
                     "out_dir": str(folder / "ck"), "export_dir": str(folder / "final"), "metrics_dir": str(folder / "m")}}
    run = setup(params.validate_params(raw), init_distributed(), silent)
    run.total_steps = warmup
    fit(run)
    before = run.seconds["train"]
    run.total_steps = warmup + steps
    fit(run)
    return steps * BATCH * MODEL["block_size"] / (run.seconds["train"] - before), run.flops_per_token


def plain_step(tokens: Path, model: torch.nn.Module, hf: bool, precision: str, compile_: bool, warmup: int, steps: int) -> float:
    """tokens/s of a plain PyTorch loop over the same batches (the pipeline's sampler)."""
    from pipeline.config.train import Batch
    from pipeline.tokens import open_tokens
    from pipeline.train.batches import WindowSampler

    sampler = WindowSampler(open_tokens(tokens / "train-00000.bin").tokens, batch=Batch(BATCH, 1, 1, MODEL["block_size"]), seed=1, rank=0)
    model.to(DEVICE)
    opt = adamw(model, 1e-3, 0.1, (0.9, 0.95), fused=True)
    forward = torch.compile(model) if compile_ else model

    def step(i: int) -> None:
        x, y = sampler.micro_batch(i, 0, DEVICE)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = forward(input_ids=x, use_cache=False).logits if hf else forward(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()

    for i in range(warmup):
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    return steps * BATCH * MODEL["block_size"] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement, alternating; medians reported")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", choices=list(PRESETS), default="nanogpt-cpu")
    parser.add_argument("--batch", type=int, help="micro batch (default: the preset's)")
    parser.add_argument("--warmup", type=int, help="steps before timing (default 10, 20 with compile)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    global MODEL, BATCH, TOKENIZER
    MODEL, BATCH, TOKENIZER = PRESETS[args.preset]
    BATCH = args.batch or BATCH
    from pipeline.config.model import ModelConfig
    from pipeline.infra.hardware import calibrate, gpu_peak_tflops, use_tf32
    from pipeline.model.build import build_model
    from pipeline.tokens import open_tokens

    use_tf32(True)
    if DEVICE == "cuda":  # the vendor's dense peak, as MFU is quoted (nanoGPT, llm-foundry)
        machine = torch.cuda.get_device_name()
        peaks = {p: (gpu_peak_tflops(machine, p, tf32=True) or float("nan")) * 1e12 for p in ("fp32", "bf16")}
    else:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        peaks = {p: calibrate(dtype, torch.device("cpu")) * 1e12 for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"{machine}, torch {torch.__version__}: peak fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s")
    if args.preset == "gpt2-124m":  # the GPU runs the issue asks for: bf16, ZeRO 1 and 2, compile off and on
        combos = [(z, "bf16", c) for z in (1, 2) for c in ((False,) if args.quick else (False, True))]
    else:
        combos = [(z, p, c) for z in ((0,) if args.quick else (0, 2)) for p in ("fp32", "bf16") for c in ((False,) if args.quick else (False, True))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokens = make_tokens(Path(tmp))
        vocab, eot = open_tokens(tokens / "train-00000.bin").vocab_size, open_tokens(tokens / "train-00000.bin").eot_id
        for zero, precision, compile_ in combos:
            warmup = args.warmup or (20 if compile_ else 10)
            ours, plain, minimal, fpt = [], [], [], 0.0
            for _ in range(args.repeats):
                tps, fpt = gptpipe_step(tokens, Path(tmp), zero, precision, compile_, warmup, args.steps)
                ours.append(tps)
                torch.manual_seed(0)
                hf = build_model(ModelConfig(**MODEL), vocab, eot)
                plain.append(plain_step(tokens, hf, True, precision, compile_, warmup, args.steps))
                torch.manual_seed(0)
                shape = {k: MODEL[k] for k in ("block_size", "n_layer", "n_head", "n_embd")}
                minimal.append(plain_step(tokens, GPT(GPTConfig(vocab_size=vocab, **shape)), False, precision, compile_, warmup, args.steps))
            o, pl, mi = statistics.median(ours), statistics.median(plain), statistics.median(minimal)
            mfu = o * fpt / peaks[precision]
            rows.append((zero, precision, compile_, o, pl, mi, mfu))
            print(f"ZeRO {zero} {precision} compile {'on' if compile_ else 'off'}: gptpipe {o:,.0f} tok/s, plain loop {pl:,.0f},"
                  f" minimal GPT {mi:,.0f}; gptpipe / plain {o / pl:.2f}, / minimal {o / mi:.2f}; MFU {100 * mfu:.1f}%", flush=True)
    if not args.no_record:
        heading, intro = ("## Training step throughput", "`python bench/train.py`: tokens/s at nanoGPT's CPU settings (4 layers, 128 wide,"
                          " block 64, batch 12), medians of alternating runs in one process; MFU against the matmul peak the script measures.")
        if args.preset == "gpt2-124m":
            heading, intro = ("## GPT-2 124M on a GPU", "`python bench/train.py --preset gpt2-124m`: GPT-2 small (12 x 768, block 1024,"
                              f" GPT-2's tokenizer), micro batch {BATCH}, bf16, SDPA attention; MFU against the GPU's dense bf16 peak.")
        for zero, precision, compile_, o, pl, mi, mfu in rows:
            row = (f"| {datetime.date.today()} | {machine}, torch {torch.__version__} |"
                   f" ZeRO {zero}, {precision}, compile {'on' if compile_ else 'off'} | {o:,.0f} | {pl:,.0f} | {mi:,.0f} | {o / pl:.2f} |"
                   f" {o / mi:.2f} | {100 * mfu:.1f}% of {peaks[precision] / 1e9:,.0f} GFLOP/s |")
            append_row(heading, row, intro=intro,
                       columns="| date | machine | setting | gptpipe tok/s | plain loop | minimal GPT | gptpipe / plain | gptpipe / minimal | gptpipe MFU |")


if __name__ == "__main__":
    main()
