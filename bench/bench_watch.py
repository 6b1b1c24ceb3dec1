"""Watching a long run: how right the ETA is, and what the watching costs.

Trains a randomly initialised Mistral of the given shape with `igea.train` (the command's own path: logs,
evaluations, checkpoints) and records every update of the run's status file, which carries the ETA each log
and progress line prints. Then:

- the ETA at 25%, 50% and 75% of the steps against the time training really took from there to its end (its
  last step's evaluation and checkpoint included): the error is |ETA - real| / real;
- the watching's cost: the time spent inside igea's clock and line-printing callbacks and status writes (every
  step, log, evaluation and save), as a share of the training's wall time, in the same run.

    python bench/bench_watch.py                          # hidden 128, 2 layers, vocab 8192: 160 steps
    python bench/bench_watch.py --hidden-size 576 --layers 30 --vocab-size 49152 --steps 40   # a 135M shape
    python bench/bench_watch.py --quick                  # a few seconds (CI): the figures are computed, not judged
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from corpus import base_texts

import igea
from igea.config import TinyModelConfig, config_from_dict
from igea.status import StatusFile
from igea.tracking import LogLines, TrainingClock
from igea.trainer import IgeaTrainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--evaluations", type=int, default=4, help="evaluations (and checkpoints) during the run")
    parser.add_argument("--validation-documents", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden_size, args.layers, args.vocab_size, args.block_size = 32, 1, 512, 32
        args.steps, args.evaluations, args.validation_documents, args.batch_size = 12, 2, 8, 2
    return args


class Timed:
    """Wraps methods so that the wall time spent inside them is summed (nested calls counted once)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.depth = 0
        self.calls = 0

    def wrap(self, owner: type, name: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            self.depth += 1
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.seconds += time.perf_counter() - started
                    self.calls += 1

        setattr(owner, name, timed)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-watch-"))
    texts = base_texts()
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    heads = max(1, args.hidden_size // 64)  # a 135M Llama: 9 heads of 64, 3 key/value heads, 1536 wide MLP
    shape = TinyModelConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                            num_attention_heads=heads, num_key_value_heads=heads // 3 if heads % 3 == 0 else heads,
                            intermediate_size=8 * args.hidden_size // 3, max_position_embeddings=args.block_size)
    model_dir = igea.build_tiny_model(texts, shape, work / "model")
    every = max(1, args.steps // args.evaluations)
    cfg = config_from_dict({
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(corpus), "block_size": args.block_size, "validation_split": args.validation_documents,
                 "cache_dir": str(work / "cache")},
        "training": {"output_dir": str(work / "run"), "max_steps": args.steps, "learning_rate": 1e-3,
                     "per_device_train_batch_size": args.batch_size, "per_device_eval_batch_size": args.batch_size,
                     "logging_steps": max(1, args.steps // 40), "eval_steps": every, "save_steps": every,
                     "save_total_limit": 1, "use_cpu": True, "disable_tqdm": True, "dataloader_num_workers": 0},
        "generation": {"prompts": []},
    })
    watching = Timed()
    clock = ("on_train_begin", "on_step_end", "on_prediction_step", "on_log", "on_evaluate", "on_save")
    for owner, names in ((TrainingClock, clock),
                         (LogLines, ("on_step_end", "on_log")), (StatusFile, ("update",))):
        for name in names:
            watching.wrap(owner, name)
    updates: list[tuple[float, dict]] = []
    update = StatusFile.update

    def recorded(self, **fields):
        update(self, **fields)
        updates.append((time.time(), dict(self.record)))

    StatusFile.update = recorded
    span: dict[str, float] = {}
    train = IgeaTrainer.train

    def timed_train(self, *a, **k):
        span["start"] = time.time()
        try:
            return train(self, *a, **k)
        finally:
            span["end"] = time.time()

    IgeaTrainer.train = timed_train
    igea.train(cfg)
    eta_at = {}
    for share in (0.25, 0.5, 0.75):
        first = next(((t, r) for t, r in updates if r.get("eta") is not None and r.get("step", 0) >= share * args.steps
                      and t <= span["end"]), None)
        if first is None:
            continue
        moment, record = first
        real = span["end"] - moment
        eta_at[f"{share:.0%}"] = {"step": record["step"], "eta_s": round(record["eta"], 2), "real_s": round(real, 2),
                                  "error": round(abs(record["eta"] - real) / real, 4) if real > 0 else None}
    seconds = span["end"] - span["start"]
    result = {"shape": {"hidden_size": args.hidden_size, "layers": args.layers, "vocab_size": args.vocab_size,
                        "block_size": args.block_size, "batch_size": args.batch_size},
              "steps": args.steps, "evaluations": args.evaluations, "train_seconds": round(seconds, 2),
              "eta_at": eta_at, "watching_seconds": round(watching.seconds, 4), "watching_calls": watching.calls,
              "watching_share": round(watching.seconds / seconds, 5), "threads": args.threads}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
