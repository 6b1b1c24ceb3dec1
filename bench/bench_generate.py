"""Batched generation with igea.Generator vs transformers' pipeline, one prompt at a time.

Both decode greedily with the same tiny Mistral (built here on the shared Italian abstracts), the same
prompts (openings of held-out abstracts) and the same number of new tokens; the script prints both wall
times and their ratio, and checks that both produce the same texts.

    python bench/bench_generate.py            # 16 prompts x 64 new tokens
    python bench/bench_generate.py --quick    # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import pipeline
from transformers.utils import logging as hf_logging

import igea
from igea.config import TinyModelConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ncbi-disease-it"
FULL_SHAPE = TinyModelConfig(vocab_size=2048, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=4, intermediate_size=768, max_position_embeddings=512)
QUICK_SHAPE = TinyModelConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 prompts, 8 tokens, smaller model, 1 run")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.new_tokens, args.repeats = 4, 8, 1
    return args


def read_texts(split: str) -> list[str]:
    path = DATA / f"{split}.jsonl"
    if not path.is_file():
        sys.exit(f"bench_generate: {path} is missing (the shared ncbi-disease-it data)")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def make_prompts(count: int) -> list[str]:
    """Openings of held-out abstracts, 4 to 31 words long (a batch needs real left padding)."""
    texts = read_texts("dev")
    return [" ".join(texts[i].split()[: 4 + (i * 7) % 28]) + " " for i in range(count)]


def median_seconds(work: Callable[[], list[str]], repeats: int) -> tuple[float, list[str]]:
    times, texts = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        texts = work()
        times.append(time.perf_counter() - started)
    return statistics.median(times), texts


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    prompts = make_prompts(args.prompts)
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(igea.build_tiny_model(read_texts("train"), shape, Path(tmp) / "model"))
        generator = igea.Generator.from_pretrained(model_dir, device=args.device)
        pipe = pipeline("text-generation", model=model_dir, device=args.device)
        greedy = {"max_new_tokens": args.new_tokens, "do_sample": False}

        def batched() -> list[str]:
            return generator.generate(prompts, batch_size=len(prompts), **greedy)

        def one_by_one() -> list[str]:
            return [pipe(p, return_full_text=False, **greedy)[0]["generated_text"] for p in prompts]

        generator.generate(prompts[:2], max_new_tokens=2, do_sample=False)  # warm-up both paths
        pipe(prompts[0], max_new_tokens=2, do_sample=False)
        igea_s, igea_texts = median_seconds(batched, args.repeats)
        pipe_s, pipe_texts = median_seconds(one_by_one, args.repeats)
        tokens = sum(c.tokens for c in generator.complete(prompts, batch_size=len(prompts), **greedy))

    params = sum(p.numel() for p in generator.model.parameters())
    same = sum(a == b for a, b in zip(igea_texts, pipe_texts, strict=True))
    print(f"model: tiny Mistral {params / 1e6:.2f}M parameters on {args.device}, torch threads "
          f"{torch.get_num_threads()}; {len(prompts)} prompts x {args.new_tokens} new tokens, greedy, "
          f"median of {args.repeats}")
    print(f"igea batched          {igea_s:8.3f} s  {tokens / igea_s:8.1f} tokens/s")
    print(f"pipeline one-by-one   {pipe_s:8.3f} s  {tokens / pipe_s:8.1f} tokens/s")
    print(f"speed-up              {pipe_s / igea_s:8.2f}x   same texts: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
