"""Preparing a corpus costs the same with one rank or two: rank 0 tokenizes, the other opens its blocks.

Runs `igea train` for one step on a fresh block cache, as one process and as two gloo ranks (torchrun), and
reports for each the wall time, the CPU seconds of every process together, and which rank tokenized
(`cache_by_rank` in the run record). If every rank tokenized the corpus, two ranks would cost about twice the
CPU of one.

    python bench/bench_prepare_ranks.py            # the shared abstracts repeated 10x (~50M tokens)
    python bench/bench_prepare_ranks.py --quick    # once (~5M tokens)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from corpus import base_texts  # bench/corpus.py (the script's own folder is on sys.path)

import igea
from igea.config import TinyModelConfig


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(name: str, launcher: list[str], tmp: Path, model: Path, corpus: Path, *overrides: str) -> dict:
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model)},
        "data": {"path": str(corpus), "block_size": 512, "validation_split": 50,
                 "cache_dir": str(tmp / f"cache-{name}")},
        "training": {"output_dir": str(tmp / name), "max_steps": 1, "per_device_train_batch_size": 2,
                     "total_train_batch_size": 4, "use_cpu": True, "eval_strategy": "no",
                     "save_strategy": "no", "disable_tqdm": True},
        "eval": {"before_training": False}, "generation": {"prompts": []},
    }), encoding="utf-8")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cpu, start = children_cpu(), time.perf_counter()
    done = subprocess.run([*launcher, "-m", "igea", "train", str(config), *overrides], capture_output=True, text=True,
                          env=env)
    seconds, cpu = time.perf_counter() - start, children_cpu() - cpu
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    record = json.loads((tmp / name / "igea_run.json").read_text(encoding="utf-8"))
    data = record["metrics"]["data"]
    return {"run": name, "processes": record["layout"]["num_devices"], "wall_s": round(seconds, 2),
            "cpu_s": round(cpu, 2), "tokens": data["train"]["tokens"] + data["validation"]["tokens"],
            "cache_by_rank": data.get("cache_by_rank", [data.get("cache")])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the abstracts once (seconds)")
    parser.add_argument("--repeat", type=int, default=10, help="copies of the abstracts in the corpus")
    args = parser.parse_args()
    repeat = 1 if args.quick else args.repeat
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        texts = base_texts()
        model = igea.build_tiny_model(texts, TinyModelConfig(vocab_size=4096, max_position_embeddings=512),
                                      tmp / "model")
        corpus = tmp / "corpus.txt"
        corpus.write_text("\n".join(texts * repeat) + "\n", encoding="utf-8")
        one = run("one", [sys.executable], tmp, model, corpus)
        two = run("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"], tmp, model, corpus,
                  "training.ddp_backend=gloo")
    for result in (one, two):
        print(json.dumps(result))
    print(json.dumps({"repeat": repeat, "cpu_ratio": round(two["cpu_s"] / one["cpu_s"], 3),
                      "wall_ratio": round(two["wall_s"] / one["wall_s"], 3),
                      "tokenized_once": two["cache_by_rank"] == ["built", "loaded"]}))


if __name__ == "__main__":
    main()
