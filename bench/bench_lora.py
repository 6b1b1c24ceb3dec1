"""LoRA against full training: peak memory and tokens/s, same model, same blocks, igea's trainer.

Each variant trains in a process of its own, so that its peak memory is its own: a randomly initialised
Mistral of the chosen shape (nothing is downloaded), random token blocks packed by igea, and the trainer
`igea train` builds with configs/igea-1b.yaml's recipe (AdamW; on a GPU bf16 autocast over fp32 weights, as
the recipe says; on CPU fp32). Variants: `full` (every weight), `lora` (rank 16 on every linear layer of the
decoder), `lora_embeddings` (the same, plus embed_tokens and lm_head trained in full: a new language), `dora`.

Reported per variant: tokens/s over the median step after `--warmup`; peak memory (GPU: torch's
max_memory_allocated; CPU: the process's peak resident memory, from the kernel); the bytes of weights,
gradients and optimizer state counted from the tensors (machine-independent); the first-step loss, which must
be the same for all variants (adapters start as the identity, so all see the same model and batches); and
MFU on a known GPU (igea.tracking.flops_per_token: 6 N_trained + 4 N_frozen + 12 L H T).

    python bench/bench_lora.py                          # CPU: tiny and small (hidden 512, 8 layers, vocab 32768)
    python bench/bench_lora.py --shape minerva-1b       # GPU: Minerva-1B's shape, block 2048
    python bench/bench_lora.py --quick                  # tiny, full vs lora, 4 steps: a smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import datasets
import torch
from gpu_throughput import MINERVA_1B, TINY, StepClock, build_model, random_blocks

from igea.arguments import training_arguments
from igea.config import IgeaConfig, load_config
from igea.data import PreparedData
from igea.lora import apply_lora
from igea.tracking import flops_per_token, peak_flops
from igea.trainer import build_trainer

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "igea-1b.yaml"
SHAPES = {
    "tiny": {**TINY, "block_size": 64, "batch_size": 4},
    "small": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
              "intermediate_size": 1536, "vocab_size": 32768, "block_size": 128, "batch_size": 4},
    "minerva-1b": {**MINERVA_1B, "block_size": 2048, "batch_size": 4},
}
VARIANTS: dict[str, list[str] | None] = {  # `peft.` overrides, None: full training
    "full": None,
    "lora": ["peft.r=16", "peft.alpha=32"],
    "lora_embeddings": ["peft.r=16", "peft.alpha=32", "peft.modules_to_save=[embed_tokens, lm_head]"],
    "dora": ["peft.r=16", "peft.alpha=32", "peft.use_dora=true"],
}


def bench_config(args: argparse.Namespace, variant: str, work: Path) -> IgeaConfig:
    """The recipe with the benchmark's batch, steps and no saving; on CPU in fp32 without compilation."""
    overrides = [
        f"training.output_dir={work}", f"training.max_steps={args.steps + args.warmup}",
        f"training.per_device_train_batch_size={args.batch_size}",
        f"training.total_train_batch_size={args.batch_size}", "training.save_strategy=\"no\"",
        "training.disable_tqdm=true", "training.torch_compile=false", "data.validation_split=0",
        "data.validation_path=null",
        f"data.block_size={args.block_size}", f"training.learning_rate={args.learning_rate}",
        "training.logging_first_step=true", f"training.logging_steps={args.steps + args.warmup}",
    ]
    if not torch.cuda.is_available():
        overrides += ["training.use_cpu=true", "training.bf16=false", "training.optim=adamw_torch"]
    return load_config(RECIPE, overrides + (VARIANTS[variant] or []))


def run_variant(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """Train one variant in this process; its speed, state bytes and losses."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = {k: v for k, v in args.shape.items() if k not in ("block_size", "batch_size")}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        cfg = bench_config(args, variant, work / "run")
        blocks = random_blocks(shape["vocab_size"], args.block_size, (args.steps + args.warmup) * args.batch_size,
                               "blocks", str(work / "data"))
        model = build_model(shape, args.block_size, torch.float32, "sdpa", device)
        if cfg.peft is not None:
            model = apply_lora(model, cfg)
        trainer = build_trainer(cfg, training_arguments(cfg), model, None, PreparedData(blocks))
        clock = StepClock()
        trainer.add_callback(clock)
        trainer.train()
    steps = [b - a for a, b in zip(clock.stamps[args.warmup - 1:], clock.stamps[args.warmup:], strict=False)]
    step_s = statistics.median(steps)
    tokens_per_s = args.batch_size * args.block_size / step_s
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    optimizer_bytes = sum(t.numel() * t.element_size() for state in trainer.optimizer.state.values()
                          for t in state.values() if torch.is_tensor(t))
    peak = peak_flops(torch.device(device))
    return {
        "variant": variant, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "shape": args.shape_name, "block_size": args.block_size, "batch_size": args.batch_size,
        "steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in params), "trainable_params": trainable,
        "step_s": round(step_s, 4), "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(tokens_per_s * flops_per_token(model, args.block_size) / peak, 4) if peak else None,
        "weights_mib": round(sum(p.numel() * p.element_size() for p in params) / 2**20, 1),
        "grads_mib": round(sum(p.numel() * p.element_size() for p in params if p.requires_grad) / 2**20, 1),
        "optimizer_mib": round(optimizer_bytes / 2**20, 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None,
        "first_loss": losses[0], "last_loss": losses[-1],
    }


def spawn(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """Run one variant in a child process; its result with the child's peak resident memory."""
    command = [sys.executable, __file__, "--variant", variant, "--shape", args.shape_name,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
               "--block-size", str(args.block_size), "--threads", str(args.threads)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status):
            message = err.read().decode(errors="replace").strip().splitlines()
            return {"variant": variant, "shape": args.shape_name, "error": message[-1] if message else "failed"}
        result = json.loads(out.read().decode().strip().splitlines()[-1])
    return {**result, "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Each variant's tokens/s and memory as ratios to full training's, measured in the same run."""
    full = next((r for r in results if r["variant"] == "full" and "error" not in r), None)
    line: dict[str, Any] = {"benchmark": "lora", "shape": results[0]["shape"]}
    if full is None:
        return line
    state = "peak_gpu_mib" if full["peak_gpu_mib"] is not None else "peak_rss_mib"
    for r in results:
        if r is full or "error" in r:
            continue
        line[f"{r['variant']}_speed_ratio"] = round(r["tokens_per_s"] / full["tokens_per_s"], 3)
        line[f"{r['variant']}_peak_memory_ratio"] = round(r[state] / full[state], 3)
        full_state = full["weights_mib"] + full["grads_mib"] + full["optimizer_mib"]
        line[f"{r['variant']}_state_ratio"] = round((r["weights_mib"] + r["grads_mib"] + r["optimizer_mib"])
                                                    / full_state, 3)
        same = abs(r["first_loss"] - full["first_loss"]) <= 1e-4 * full["first_loss"]
        line[f"{r['variant']}_same_first_loss"] = same
    return line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", choices=list(SHAPES),
                        help="model shape, repeatable (default: tiny and small on CPU, minerva-1b on a GPU)")
    parser.add_argument("--variants", default="full,lora,lora_embeddings,dora",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    parser.add_argument("--batch-size", type=int, help="per-device batch (default: the shape's)")
    parser.add_argument("--block-size", type=int, help="tokens per block (default: the shape's)")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (torch.set_num_threads)")
    parser.add_argument("--quick", action="store_true", help="tiny shape, full vs lora, 4 steps (for CI)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # a child process: run this one variant
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.variants, args.steps, args.warmup = ["tiny"], "full,lora", 3, 1
    args.shapes = args.shape or (["minerva-1b"] if torch.cuda.is_available() else ["tiny", "small"])
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(VARIANTS)}")
    if args.warmup < 1:
        parser.error("--warmup: at least one step must be left out of the timing")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    datasets.disable_progress_bars()
    if args.variant:  # child: one variant, one shape
        torch.set_num_threads(args.threads)
        args.shape_name, args.shape = args.shapes[0], SHAPES[args.shapes[0]]
        print(json.dumps(run_variant(args, args.variant)), flush=True)
        return 0
    batch_size, block_size = args.batch_size, args.block_size
    failed = 0
    for name in args.shapes:
        args.shape_name, args.shape = name, SHAPES[name]
        args.batch_size = batch_size or args.shape["batch_size"]
        args.block_size = block_size or args.shape["block_size"]
        results = []
        for variant in args.variants:
            results.append(spawn(args, variant))
            failed += "error" in results[-1]
            print(json.dumps(results[-1]), flush=True)
        print(json.dumps(summary(results)), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
