"""GPU training throughput of a Minerva-1B-shaped Mistral: a plain Trainer's defaults against igea's.

Random weights (Minerva-1B's shape: hidden 2048, 16 layers, 16 heads, 4 KV heads, intermediate 7168,
vocab 32768) and random token blocks packed by igea (nothing is downloaded), a fixed number of steps. Each
variant prints one JSON line: tokens/s, MFU, peak memory and the per-device batch that fitted (starting at
`--batch-size`, halved on out-of-memory by accelerate's `find_executable_batch_size`).

    python bench/gpu_throughput.py --variants plain,igea_card_layout_compile   # plain vs the shipped recipe
    python bench/gpu_throughput.py                                # plain, igea, igea_documents on one GPU
    python bench/gpu_throughput.py --variants all                 # every variant below
    python bench/gpu_throughput.py --tiny                         # CPU smoke test, a few seconds

MFU = tokens/s x (6 N + 12 L H T) / peak bf16 dense FLOP/s, with N the parameters that multiply (all but
the input embedding), L layers, H hidden size, T block size (PaLM's accounting, attention counted in full).
torch's memory-efficient SDPA kernel is not offered: it refuses grouped-query attention (16 vs 4 heads).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate.utils import find_executable_batch_size
from datasets import Dataset
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from igea.arguments import training_arguments
from igea.config import IgeaConfig, load_config
from igea.data import PreparedData, pack_blocks
from igea.modeling import DTYPES
from igea.tracking import PEAK_BF16_TFLOPS, flops_per_token
from igea.trainer import build_trainer

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "igea-1b.yaml"
MINERVA_1B = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 4,
              "intermediate_size": 7168, "vocab_size": 32768}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": 512}


@dataclass(frozen=True)
class Variant:
    """One way of training: whose trainer and defaults, and what is changed on top of them."""

    trainer: str  # "plain": Trainer with TrainingArguments defaults; "igea": igea's recipe and trainer
    packing: str = "blocks"
    sdpa_backend: str | None = None  # force one torch SDPA kernel: flash or cudnn
    compile: bool = False
    weights: str | None = None  # model.dtype instead of the recipe's (bfloat16: pure bf16 weights)
    accumulation: int = 1  # micro-batches per optimizer step (the card's 64 on one GPU of 8 is 8)


VARIANTS = {
    "plain": Variant("plain"),
    "igea": Variant("igea"),
    "igea_documents": Variant("igea", packing="documents"),
    "igea_flash": Variant("igea", sdpa_backend="flash"),
    "igea_cudnn": Variant("igea", sdpa_backend="cudnn"),
    "igea_bf16_weights": Variant("igea", weights="bfloat16"),
    "igea_compile": Variant("igea", compile=True),
    "igea_card_layout": Variant("igea", accumulation=8),
    "igea_card_layout_compile": Variant("igea", accumulation=8, compile=True),
}
DEFAULT_VARIANTS = "plain,igea,igea_documents"


class StepClock(TrainerCallback):
    """Stamps the end of every optimizer step, after the GPU has finished it."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


# ----------------------------------------------------------------------------------------------------------
# Model, data and trainers


def build_model(shape: dict[str, int], block_size: int, dtype: torch.dtype, attn: str,
                device: str) -> MistralForCausalLM:
    """A randomly initialised Mistral of `shape`, created directly on `device`."""
    config = MistralConfig(**shape, max_position_embeddings=block_size, sliding_window=None,
                           tie_word_embeddings=False, attn_implementation=attn)
    torch.manual_seed(0)
    with torch.device(device):
        model = MistralForCausalLM(config)
    return model.to(dtype)


def random_blocks(vocab_size: int, block_size: int, count: int, packing: str, cache_dir: str) -> Dataset:
    """`count` blocks of random tokens, packed by igea from random documents of 16 to 1023 tokens."""
    rng = np.random.default_rng(0)
    documents, total = [], 0
    while total < (count + 1) * block_size:
        length = int(rng.integers(16, 1024))
        documents.append(rng.integers(3, vocab_size, size=length, dtype=np.int32))
        total += length
    tokens = Dataset.from_dict({"input_ids": documents})
    blocks, _ = pack_blocks(tokens, block_size, packing, cache_dir)
    return blocks.select(range(count))


def recipe_config(args: argparse.Namespace, variant: Variant, batch_size: int, work: Path) -> IgeaConfig:
    """igea's recipe (configs/igea-1b.yaml) with the benchmark's steps, batch, accumulation and compilation."""
    overrides = [
        f"training.output_dir={work / 'igea'}", f"training.max_steps={args.steps + args.warmup}",
        f"training.per_device_train_batch_size={batch_size}",
        f"training.total_train_batch_size={batch_size * variant.accumulation}",
        "training.save_strategy=\"no\"", "training.disable_tqdm=true", "data.validation_split=0",
        "data.validation_path=null",
        f"data.block_size={args.block_size}", f"data.packing={variant.packing}",
    ]
    overrides.append(f"training.torch_compile={str(variant.compile).lower()}")  # the variant decides
    if variant.weights:
        overrides.append(f"model.dtype={variant.weights}")
    if not torch.cuda.is_available():
        overrides.append("training.use_cpu=true")
    return load_config(args.config, overrides)


def igea_trainer(args: argparse.Namespace, variant: Variant, batch_size: int, work: Path, device: str) -> Trainer:
    """What `igea train` builds from the recipe, over random blocks and a random model."""
    cfg = recipe_config(args, variant, batch_size, work)
    count = (args.steps + args.warmup) * batch_size * variant.accumulation
    blocks = random_blocks(args.shape["vocab_size"], args.block_size, count, variant.packing, str(work / "data"))
    model = build_model(args.shape, args.block_size, DTYPES.get(cfg.model.dtype, torch.float32),
                        cfg.model.attn_implementation or "sdpa", device)
    if variant.packing == "documents":
        model.config.use_cache = False  # as igea.train does
    return build_trainer(cfg, training_arguments(cfg), model, None, PreparedData(blocks))


def plain_trainer(args: argparse.Namespace, variant: Variant, batch_size: int, work: Path, device: str) -> Trainer:
    """Trainer with TrainingArguments defaults (fp32, default collator), labels = input_ids as run_clm does."""
    count = (args.steps + args.warmup) * batch_size
    blocks = random_blocks(args.shape["vocab_size"], args.block_size, count, "blocks", str(work / "data"))
    blocks = blocks.map(lambda batch: {"labels": batch["input_ids"]}, batched=True)
    training = TrainingArguments(
        output_dir=str(work / "plain"), per_device_train_batch_size=batch_size,
        max_steps=args.steps + args.warmup, save_strategy="no", report_to="none", disable_tqdm=True,
        torch_compile=variant.compile, use_cpu=not torch.cuda.is_available(),
    )
    model = build_model(args.shape, args.block_size, torch.float32, "sdpa", device)
    return Trainer(model=model, args=training, train_dataset=blocks)


# ----------------------------------------------------------------------------------------------------------
# Measuring


def sdpa_backend(name: str | None):
    """A context forcing one torch SDPA kernel, or nothing."""
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    return sdpa_kernel(backends[name])


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in device_name), None)


def run_variant(args: argparse.Namespace, name: str, batch_size: int, device: str) -> dict[str, Any]:
    """Train one variant for warmup + steps; throughput over the steps after warmup."""
    variant = VARIANTS[name]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as scratch:
        build = igea_trainer if variant.trainer == "igea" else plain_trainer
        trainer = build(args, variant, batch_size, Path(scratch), device)
        clock = StepClock()
        trainer.add_callback(clock)
        with sdpa_backend(variant.sdpa_backend):
            output = trainer.train()
    tokens_per_step = batch_size * trainer.args.gradient_accumulation_steps * args.block_size
    elapsed = clock.stamps[-1] - clock.stamps[args.warmup - 1]
    tokens_per_s = args.steps * tokens_per_step / elapsed
    peak = peak_flops(args.device_name, args.peak_tflops)
    model = trainer.model
    result = {
        "variant": name, "device": args.device_name, "batch_size": batch_size, "block_size": args.block_size,
        "steps": args.steps, "warmup": args.warmup, "params": model.num_parameters(),
        "weights_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "bf16_autocast": trainer.args.bf16, "attn": model.config._attn_implementation,
        "sdpa_backend": variant.sdpa_backend or "auto", "packing": variant.packing, "compile": variant.compile,
        "optim": str(trainer.args.optim.value), "step_s": round(elapsed / args.steps, 4),
        "tokens_per_s": round(tokens_per_s), "train_loss": round(output.training_loss, 4),
        "mfu": round(tokens_per_s * flops_per_token(model, args.block_size) / peak, 4) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
    }
    del trainer, model, output
    gc.collect()
    return result


def measure(args: argparse.Namespace, name: str, device: str) -> dict[str, Any]:
    """Run a variant at the largest batch from `--batch-size` down (halving) that fits in memory."""

    @find_executable_batch_size(starting_batch_size=args.batch_size)
    def attempt(batch_size: int) -> dict[str, Any]:
        return run_variant(args, name, batch_size, device)

    return attempt()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated, or 'all': {', '.join(VARIANTS)} (default {DEFAULT_VARIANTS})")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (at least 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="per-device batch to start from")
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--config", type=Path, default=RECIPE, help="igea recipe whose training section is used")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if unknown")
    parser.add_argument("--tiny", action="store_true", help="tiny model, block 64, 3 steps: a CPU smoke test")
    args = parser.parse_args(argv)
    names = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        parser.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    args.variants = names
    args.shape = TINY if args.tiny else MINERVA_1B
    if args.tiny:
        args.block_size, args.steps, args.warmup, args.batch_size = 64, 3, 1, 2
    if args.warmup < 1:
        parser.error(f"--warmup {args.warmup}: at least one step must be left out of the timing")
    if not torch.cuda.is_available() and not args.tiny:
        parser.error("no CUDA GPU found; pass --tiny for the CPU smoke test")
    args.device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    datasets.disable_progress_bars()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    failed = 0
    for name in args.variants:
        try:
            result = measure(args, name, device)
        except Exception as err:  # one broken variant (a kernel missing on this GPU) must not hide the others
            failed += 1
            result = {"variant": name, "device": args.device_name, "error": f"{type(err).__name__}: {err}"[:300]}
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
