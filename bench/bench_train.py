"""Training throughput: igea's trainer against a plain transformers Trainer, same model, same blocks.

igea's side is what `igea train` builds: `training_arguments(cfg)` (the card's recipe as defaults) and
`build_trainer` with its `BlockCollator`. The baseline is `Trainer` with `TrainingArguments` defaults and
`DataCollatorForLanguageModeling(mlm=False)`. Both get the same blocks (igea's `prepare_dataset` over the
shared Italian abstracts), the same tiny Mistral loaded from one directory, the same batch, steps and seed;
their first-step losses must be equal, which shows they train on the same batches.

A TrainerCallback stamps the end of every step; the `--warmup` first steps are left out. The reported speed
comes from the fastest step of all interleaved runs (as `timeit` does): on a shared CPU whose speed jumps
from one second to the next, that is the one figure both trainers reach under the same conditions. The
median step is reported beside it. `--threads` sets torch's threads, 1 by default: on a CPU shared with
other jobs, two threads mostly wait on each other.

    python bench/bench_train.py           # hidden 128, 2 layers, block 128, batch 8, 40 steps, 3 runs each
    python bench/bench_train.py --quick   # a few seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from igea.arguments import training_arguments
from igea.basemodel import load_model
from igea.config import IgeaConfig, TinyModelConfig, config_from_dict
from igea.data import PreparedData, prepare_dataset
from igea.modeling import build_tiny_model
from igea.trainer import build_trainer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ncbi-disease-it"


class StepClock(TrainerCallback):
    """Stamps the end of every optimizer step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())


def shared_training(args: argparse.Namespace) -> dict[str, Any]:
    """The settings both trainers get; everything else is each side's own defaults."""
    return {
        "max_steps": args.steps, "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "seed": 42, "use_cpu": True,
        "save_strategy": "no", "report_to": "none", "logging_steps": args.steps, "logging_first_step": True,
        "disable_tqdm": True,
    }


def make_config(args: argparse.Namespace, model_dir: Path, work: Path) -> IgeaConfig:
    """igea's config for the run: the shared settings, igea's defaults for the rest."""
    return config_from_dict({
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(args.data / "train.jsonl"), "block_size": args.block_size, "validation_split": 0,
                 "packing": args.packing, "cache_dir": str(work / "cache")},
        "training": {**shared_training(args), "output_dir": str(work / "igea")},
    })


def igea_trainer(cfg: IgeaConfig, data: PreparedData) -> Trainer:
    """igea's trainer, built as `igea train` builds it."""
    model, tokenizer = load_model(cfg)
    if cfg.data.packing == "documents":
        model.config.use_cache = False
    return build_trainer(cfg, training_arguments(cfg), model, tokenizer, data)


def plain_trainer(args: argparse.Namespace, model_dir: Path, work: Path, data: PreparedData) -> Trainer:
    """A plain transformers Trainer with its defaults and the language-modeling collator."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return Trainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=TrainingArguments(**shared_training(args), output_dir=str(work / "plain")),
        train_dataset=data.train.select_columns(["input_ids"]),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )


def clocked_train(trainer: Trainer, warmup: int) -> tuple[list[float], float]:
    """Train; the durations of the steps after `warmup`, and the loss of the first step."""
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    first_loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return np.diff(clock.stamps[warmup - 1:]).tolist(), first_loss


def tiny_model(args: argparse.Namespace, out_dir: Path) -> Path:
    """A randomly initialised Mistral of the asked shape, with a BPE tokenizer trained on the abstracts."""
    lines = (args.data / "train.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines if line.strip()]
    shape = TinyModelConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=3 * args.hidden_size,
        max_position_embeddings=args.block_size,
    )
    return build_tiny_model(texts, shape, out_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="folder with train.jsonl (`text`)")
    parser.add_argument("--packing", choices=["blocks", "documents"], default="blocks")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing (at least 1)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each trainer")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (torch.set_num_threads)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 6 steps, one run (for CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.block_size, args.batch_size, args.steps, args.warmup, args.repeats = 64, 4, 6, 2, 1
        args.hidden_size, args.layers, args.vocab_size = 64, 2, 512
    if not 1 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must be at least 1 and below --steps {args.steps}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    steps: dict[str, list[float]] = {"plain": [], "igea": []}
    first_loss: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        model_dir = tiny_model(args, work / "model")
        cfg = make_config(args, model_dir, work)
        data = prepare_dataset(cfg, AutoTokenizer.from_pretrained(model_dir))
        for _ in range(args.repeats):  # interleaved, so a busy moment on a shared machine hits both
            for name, build in (("plain", lambda: plain_trainer(args, model_dir, work, data)),
                                ("igea", lambda: igea_trainer(cfg, data))):
                durations, first_loss[name] = clocked_train(build(), args.warmup)
                steps[name].extend(durations)
    return report(steps, first_loss, args)


def report(steps: dict[str, list[float]], first_loss: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    tokens_per_step = args.batch_size * args.block_size
    fastest = {name: tokens_per_step / min(values) for name, values in steps.items()}
    median = {name: tokens_per_step / float(np.median(values)) for name, values in steps.items()}
    result = {
        "benchmark": "train", "packing": args.packing, "block_size": args.block_size,
        "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "threads": args.threads,
        "plain_tokens_per_s": round(fastest["plain"]), "igea_tokens_per_s": round(fastest["igea"]),
        "ratio": round(fastest["igea"] / fastest["plain"], 3),
        "plain_median_tokens_per_s": round(median["plain"]), "igea_median_tokens_per_s": round(median["igea"]),
        "median_ratio": round(median["igea"] / median["plain"], 3),
        "first_loss_plain": first_loss["plain"], "first_loss_igea": first_loss["igea"],
    }
    print(f"plain Trainer  {result['plain_tokens_per_s']:>9,} tokens/s  (median step {median['plain']:,.0f})")
    print(f"igea           {result['igea_tokens_per_s']:>9,} tokens/s  (median step {median['igea']:,.0f})")
    print(f"ratio          {result['ratio']:.3f}x  (median {result['median_ratio']:.3f}x)")
    print(f"first-step loss: plain {first_loss['plain']}, igea {first_loss['igea']}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
