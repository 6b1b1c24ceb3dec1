"""Held-out evaluation speed: igea's training evaluation against `Trainer.evaluate` with run_clm's metrics.

The baseline is what transformers' examples/pytorch/language-modeling/run_clm.py evaluates with: a plain
`Trainer`, `preprocess_logits_for_metrics` = argmax, `compute_metrics` = accuracy of prediction i against
label i + 1, and `eval_loss` the model's own loss. igea's side is what `igea train` builds (`training_arguments`
+ `build_trainer`): the exact token-weighted loss and the same accuracy. Also timed: `held_out_metrics` (what
`igea eval` runs), and igea's previous evaluation (the model's loss, then a second cross-entropy over a float,
shifted and transposed copy of the logits; issue 19), so that one run shows before and after.

All get the same blocks of random tokens (the cost does not depend on the text) and the same randomly
initialised Mistral with tied embeddings and a 32,768-token vocabulary, where the cross-entropy over the
vocabulary is a large share of the evaluation. The sides run interleaved; the fastest run of each gives the
speed (as `timeit` does), the median is printed beside it. The losses must agree (1e-4 with run_clm's
mean of per-batch means, 1e-6 among igea's evaluations) and the accuracies must be equal.

`--load N` times all of it with N neighbour processes on the cores (each a loop of float32 matmuls on a
thread per core, started before the first run and stopped after the last): a machine shared with other jobs,
made reproducible. Every op on a CPU is a parallel region whose threads wait for each other at its end, and a
thread the scheduler has put aside makes that wait long, so an evaluation of many small ops suffers most.

    python bench/bench_eval.py           # 136 blocks of 128, batch 8, hidden 128, vocab 32768, 3 runs each
    python bench/bench_eval.py --hidden-size 576 --layers 30 --vocab-size 49152 --blocks 48 --threads 2
                                         # the shape of a 135M-parameter Llama (SmolLM-135M's vocabulary)
    python bench/bench_eval.py --load 2  # the default shape with two neighbour processes on the cores
    python bench/bench_eval.py --quick   # 16 blocks of 64, a few seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from gpu_throughput import random_blocks
from transformers import MistralConfig, MistralForCausalLM, Trainer, TrainingArguments, default_data_collator

from igea.arguments import training_arguments
from igea.config import config_from_dict
from igea.data import PreparedData
from igea.evaluate import held_out_metrics
from igea.trainer import build_trainer


def build_model(args: argparse.Namespace) -> MistralForCausalLM:
    """A randomly initialised Mistral with tied input and output embeddings (as most small models have)."""
    config = MistralConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=3 * args.hidden_size,
                           max_position_embeddings=args.block_size, sliding_window=None, tie_word_embeddings=True)
    torch.manual_seed(0)
    return MistralForCausalLM(config).eval()


# ----------------------------------------------------------------------------------------------------------
# run_clm's evaluation


def run_clm_preprocess(logits, labels):
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def run_clm_accuracy(eval_preds) -> dict[str, float]:
    """run_clm's `compute_metrics` (its `evaluate.load("accuracy")` is the mean of equal pairs)."""
    preds, labels = eval_preds
    labels, preds = labels[:, 1:].reshape(-1), preds[:, :-1].reshape(-1)
    return {"accuracy": float(np.mean(preds == labels))}


def run_clm_evaluate(model, blocks, args: argparse.Namespace, work: Path) -> dict[str, float]:
    with_labels = blocks.map(lambda b: {"labels": b["input_ids"], "attention_mask": [[1] * len(ids) for ids in
                                                                                     b["input_ids"]]},
                             batched=True)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(work / "run_clm"), per_device_eval_batch_size=args.batch_size,
                               use_cpu=True, report_to="none", disable_tqdm=True),
        eval_dataset=with_labels,
        data_collator=default_data_collator,
        compute_metrics=run_clm_accuracy,
        preprocess_logits_for_metrics=run_clm_preprocess,
    )
    metrics = trainer.evaluate()
    return {"loss": metrics["eval_loss"], "accuracy": metrics["eval_accuracy"]}


# ----------------------------------------------------------------------------------------------------------
# igea's evaluations


def igea_trainer(model, blocks, args: argparse.Namespace, work: Path) -> Trainer:
    cfg = config_from_dict({
        "model": {"name_or_path": "unused"},
        "data": {"path": "unused", "block_size": args.block_size, "validation_split": 0},
        "training": {"output_dir": str(work / "igea"), "per_device_eval_batch_size": args.batch_size,
                     "use_cpu": True, "report_to": "none", "disable_tqdm": True},
    })
    return build_trainer(cfg, training_arguments(cfg), model, None, PreparedData(blocks, {"validation": blocks}))


def igea_evaluate(model, blocks, args: argparse.Namespace, work: Path) -> dict[str, float]:
    metrics = igea_trainer(model, blocks, args, work).evaluate()
    return {"loss": metrics["eval_loss"], "accuracy": metrics["eval_accuracy"], "tokens": metrics["eval_tokens"]}


def previous_argmax_and_nll(logits, labels):
    """igea's metric before issue 19: a second cross-entropy over a float, shifted and transposed copy."""
    shifted = logits[:, :-1].float().transpose(1, 2)
    nll = F.cross_entropy(shifted, labels[:, 1:], ignore_index=-100, reduction="none").sum(dim=-1)
    return logits.argmax(dim=-1), nll


def igea_previous_evaluate(model, blocks, args: argparse.Namespace, work: Path) -> dict[str, float]:
    trainer = igea_trainer(model, blocks, args, work)
    trainer.prediction_step = types.MethodType(Trainer.prediction_step, trainer)  # the model computes its loss
    trainer.preprocess_logits_for_metrics = previous_argmax_and_nll
    metrics = trainer.evaluate()
    return {"loss": metrics["eval_loss"], "accuracy": metrics["eval_accuracy"], "tokens": metrics["eval_tokens"]}


def igea_eval_evaluate(model, blocks, args: argparse.Namespace, work: Path) -> dict[str, float]:
    return held_out_metrics(model, blocks, args.batch_size)


NEIGHBOUR = """
import os
import torch
torch.set_num_threads(os.cpu_count())
a = torch.randn(1024, 1024)
print("ready", flush=True)
while True:
    a @ a
"""
"""A neighbour job for `--load`: float32 matmuls on a thread per core, as a torch job (a test, a training run)
runs by default. One-thread neighbours hurt far less: they keep the cores busy, but no thread of theirs waits
for another, so the scheduler does not keep swapping threads in and out."""


def start_neighbours(count: int) -> list[subprocess.Popen]:
    """`count` neighbour processes, each busy once this returns."""
    neighbours = [subprocess.Popen([sys.executable, "-c", NEIGHBOUR], stdout=subprocess.PIPE, text=True)
                  for _ in range(count)]
    for neighbour in neighbours:
        neighbour.stdout.readline()
    return neighbours


def stop_neighbours(neighbours: list[subprocess.Popen]) -> None:
    for neighbour in neighbours:
        neighbour.kill()
        neighbour.wait()
        neighbour.stdout.close()


SIDES = {"run_clm": run_clm_evaluate, "igea": igea_evaluate, "igea_eval": igea_eval_evaluate,
         "igea_previous": igea_previous_evaluate}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=136)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (torch.set_num_threads)")
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="N neighbour processes (matmul loops, a thread per core) on the cores during the timing")
    parser.add_argument("--quick", action="store_true", help="16 blocks of 64, one run (for CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.blocks, args.block_size, args.batch_size, args.hidden_size, args.repeats = 16, 64, 4, 64, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    seconds: dict[str, list[float]] = {name: [] for name in SIDES}
    results: dict[str, dict[str, float]] = {}
    model = build_model(args)
    load_average = [round(os.getloadavg()[0], 2)]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        blocks = random_blocks(args.vocab_size, args.block_size, args.blocks, "blocks", str(work / "data"))
        neighbours = start_neighbours(args.load)
        try:
            for _ in range(args.repeats):  # interleaved, so a busy moment on a shared machine hits every side
                for name, evaluate in SIDES.items():
                    start = time.perf_counter()
                    results[name] = evaluate(model, blocks, args, work)
                    seconds[name].append(time.perf_counter() - start)
        finally:
            stop_neighbours(neighbours)
    load_average.append(round(os.getloadavg()[0], 2))
    params = sum(p.numel() for p in model.parameters())
    return report(args, seconds, results, {"params": params, "load": args.load, "load_average": load_average})


def report(args: argparse.Namespace, seconds: dict[str, list[float]], results: dict[str, dict],
           setting: dict[str, Any]) -> dict[str, Any]:
    best = {name: min(values) for name, values in seconds.items()}
    median = {name: statistics.median(values) for name, values in seconds.items()}
    igea_losses = [results[name]["loss"] for name in ("igea", "igea_eval", "igea_previous")]
    result = {
        "benchmark": "eval", "blocks": args.blocks, "block_size": args.block_size, "batch_size": args.batch_size,
        "hidden_size": args.hidden_size, "layers": args.layers, "vocab_size": args.vocab_size,
        "repeats": args.repeats, "threads": args.threads, **setting,
        **{f"{name}_s": round(best[name], 3) for name in SIDES},
        "ratio": round(best["run_clm"] / best["igea"], 3),
        "median_ratio": round(median["run_clm"] / median["igea"], 3),
        "igea_eval_ratio": round(best["run_clm"] / best["igea_eval"], 3),
        "previous_ratio": round(best["run_clm"] / best["igea_previous"], 3),
        "losses": {name: r["loss"] for name, r in results.items()},
        "same_loss": abs(results["igea"]["loss"] - results["run_clm"]["loss"]) < 1e-4
        and max(igea_losses) - min(igea_losses) <= 1e-6 * igea_losses[0],
        "same_accuracy": len({r["accuracy"] for r in results.values()}) == 1,
    }
    for name in SIDES:
        print(f"{name:14} {best[name]:8.3f} s  (median {median[name]:.3f} s)  loss {results[name]['loss']:.6f}  "
              f"accuracy {results[name]['accuracy']:.6f}")
    print(f"speed against run_clm: igea {result['ratio']:.3f}x (median {result['median_ratio']:.3f}x), igea eval "
          f"{result['igea_eval_ratio']:.3f}x, igea before issue 19 {result['previous_ratio']:.3f}x")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome["same_loss"] and outcome["same_accuracy"] else 1)
