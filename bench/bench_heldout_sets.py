"""Evaluating N named held-out sets against one evaluation over their union: the cost of seeing each set.

igea's trainer evaluates every held-out set on its own (`eval_<set>_loss`, ...) and adds the token-weighted
totals. The baseline is one evaluation of the same blocks concatenated into one set (what a run with a single
mixed validation split does). Same model, same blocks, same batch size; the two evaluations are interleaved,
the best of `--repeats` is kept for each. The totals must be equal: the sets' token-weighted loss and accuracy
are the union's.

    python bench/bench_heldout_sets.py            # 4 sets of real abstracts and general Italian, hidden 256
    python bench/bench_heldout_sets.py --quick    # 2 small sets, tiny model, 1 repeat: a smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from corpus import base_texts
from datasets import concatenate_datasets

import igea
from igea.arguments import training_arguments
from igea.basemodel import load_tokenizer
from igea.config import GENERAL_TEXT, TinyModelConfig, load_config
from igea.data import prepare_dataset
from igea.modeling import load_causal_lm
from igea.trainer import build_trainer

SHAPES = {
    "tiny": TinyModelConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512),
    "small": TinyModelConfig(vocab_size=2048, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=768, max_position_embeddings=512),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 small sets, the tiny model, 1 repeat")
    parser.add_argument("--sets", type=int, default=4, help="held-out sets (the last one is general Italian)")
    parser.add_argument("--documents", type=int, default=60, help="abstracts in each domain set")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    args = parser.parse_args()
    args.shape = "small"
    if args.quick:
        args.sets, args.documents, args.repeats, args.shape, args.block_size = 2, 12, 1, "tiny", 64
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    texts = base_texts()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        model_dir = igea.build_tiny_model(texts[:2000], SHAPES[args.shape], work / "model")
        sets: dict[str, str] = {}
        for i in range(args.sets - 1):  # domain sets: consecutive abstracts from the end of the texts
            part = texts[-(i + 1) * args.documents:][:args.documents]
            path = work / f"domain{i}.txt"
            path.write_text("\n".join(part) + "\n", encoding="utf-8")
            sets[f"domain{i}"] = str(path)
        sets["general"] = GENERAL_TEXT
        train = work / "train.txt"
        train.write_text("\n".join(texts[:200]) + "\n", encoding="utf-8")
        cfg = load_config({
            "model": {"name_or_path": str(model_dir)},
            "data": {"path": str(train), "validation_split": 0, "validation_path": sets,
                     "block_size": args.block_size, "cache_dir": str(work / "cache")},
            "training": {"output_dir": str(work / "run"), "per_device_eval_batch_size": args.batch_size,
                         "use_cpu": True, "disable_tqdm": True, "report_to": "none"},
        })
        tokenizer = load_tokenizer(cfg)
        data = prepare_dataset(cfg, tokenizer)
        model = load_causal_lm(str(model_dir), cfg.model)
        trainer = build_trainer(cfg, training_arguments(cfg), model, tokenizer, data)
        union = concatenate_datasets(list(data.validation_sets.values()))
        trainer.evaluate()  # warm-up: model preparation, first allocations
        seconds = {"sets": [], "union": []}
        results = {}
        for _ in range(args.repeats):
            for name, dataset in (("sets", None), ("union", union)):
                started = time.perf_counter()
                results[name] = trainer.evaluate(eval_dataset=dataset)
                seconds[name].append(time.perf_counter() - started)
    sets_s, union_s = min(seconds["sets"]), min(seconds["union"])
    print(json.dumps({
        "sets": args.sets, "blocks": len(union), "block_size": args.block_size, "batch_size": args.batch_size,
        "shape": args.shape, "threads": args.threads, "sets_s": round(sets_s, 4), "union_s": round(union_s, 4),
        "ratio": round(sets_s / union_s, 4), "all_sets_s": [round(s, 4) for s in seconds["sets"]],
        "all_union_s": [round(s, 4) for s in seconds["union"]],
        "loss_sets": results["sets"]["eval_loss"], "loss_union": results["union"]["eval_loss"],
        "same_totals": abs(results["sets"]["eval_loss"] - results["union"]["eval_loss"]) < 1e-6
        and abs(results["sets"]["eval_accuracy"] - results["union"]["eval_accuracy"]) < 1e-9
        and results["sets"]["eval_tokens"] == results["union"]["eval_tokens"],
    }))


if __name__ == "__main__":
    main()
