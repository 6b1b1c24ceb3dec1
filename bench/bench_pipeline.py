"""Data pipeline throughput: igea's tokenize + pack against run_clm's tokenize + group_texts.

Both pipelines tokenize the same documents (the shared Italian abstracts, repeated to at least `--tokens`
tokens) with the same BPE tokenizer trained here, with `datasets` caching off, and only tokenize + pack is
timed. The baseline is written the way transformers' examples/pytorch/language-modeling/run_clm.py does it:
`map` the tokenizer over batches of 1000 documents, then `map` a group_texts that concatenates each batch's
python lists and cuts them into blocks (dropping each batch's tail).

Fairness of the comparison: both token streams are compared before cutting (they must be identical), then
each pipeline's blocks are checked against that one stream: igea's are the stream cut in order with one
remainder at the end; run_clm's are the stream cut per 1000-document batch, each batch dropping its own tail.

    python bench/bench_pipeline.py            # full: >= 5M tokens, vocab 32768, block 2048, best of 3
    python bench/bench_pipeline.py --quick    # a few seconds, for CI

`--threads` sets the tokenizer's worker threads (RAYON_NUM_THREADS), 1 by default: on a CPU shared with
other jobs, two threads spend their time waiting on each other and make every run's timing a lottery.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from igea.config import DataConfig
from igea.data import pack_blocks, tokenize_corpus
from igea.modeling import train_bpe_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ncbi-disease-it"
RUN_CLM_BATCH = 1000  # datasets' default map batch size, which run_clm keeps for group_texts
STEPS = ("run_clm_tokenize", "run_clm_group", "igea_tokenize", "igea_pack", "tokenizer_alone")


def read_texts(data_dir: Path) -> list[str]:
    """The `text` field of every JSON line of every .jsonl file in `data_dir`."""
    files = sorted(data_dir.glob("*.jsonl"))
    if not files:
        raise SystemExit(f"no .jsonl files in {data_dir}; pass --data DIR")
    lines = [line for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [json.loads(line)["text"] for line in lines]


def repeated_corpus(texts: list[str], tokenizer: PreTrainedTokenizerBase, min_tokens: int) -> Dataset:
    """The texts repeated whole until they hold at least `min_tokens` tokens."""
    per_copy = sum(len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return Dataset.from_dict({"text": texts * math.ceil(min_tokens / per_copy)})


# ----------------------------------------------------------------------------------------------------------
# The two pipelines, each in two steps: tokenize, then cut into blocks


def run_clm_tokenize(documents: Dataset, tokenizer: PreTrainedTokenizerBase, boundary: str) -> Dataset:
    """run_clm's tokenize_function mapped over the documents (input_ids and attention_mask).

    With `boundary="eos"` an EOS is appended to every document, the one change needed for the baseline to
    produce igea's default token stream; `special_tokens` is run_clm's tokenize_function unchanged.
    """
    eos = tokenizer.eos_token_id

    def tokenize_function(examples: dict[str, list]) -> dict[str, list]:
        output = tokenizer(examples["text"])
        if boundary == "eos":
            output["input_ids"] = [ids + [eos] for ids in output["input_ids"]]
            output["attention_mask"] = [mask + [1] for mask in output["attention_mask"]]
        return output

    return documents.map(tokenize_function, batched=True, remove_columns=documents.column_names,
                         load_from_cache_file=False)


def run_clm_group(tokenized: Dataset, block_size: int) -> Dataset:
    """run_clm's group_texts: concatenate python lists per batch of 1000 documents, cut, copy labels."""

    def group_texts(examples: dict[str, list]) -> dict[str, list]:
        joined = {key: list(chain(*examples[key])) for key in examples}
        usable = len(joined["input_ids"]) // block_size * block_size
        starts = range(0, usable, block_size)
        result = {key: [seq[i: i + block_size] for i in starts] for key, seq in joined.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    return tokenized.map(group_texts, batched=True, batch_size=RUN_CLM_BATCH, load_from_cache_file=False)


def igea_tokenize(documents: Dataset, tokenizer: PreTrainedTokenizerBase, boundary: str) -> Dataset:
    return tokenize_corpus(documents, tokenizer, DataConfig(document_boundary=boundary))


def igea_pack(tokens: Dataset, block_size: int, scratch: str) -> tuple[Dataset, dict[str, int]]:
    """`pack_blocks` into a fresh cache directory under `scratch`, so no earlier result is reused."""
    return pack_blocks(tokens, block_size, "blocks", tempfile.mkdtemp(dir=scratch))


def tokenizer_alone(documents: Dataset, tokenizer: PreTrainedTokenizerBase) -> None:
    """Only the Rust tokenizer on the same batches: the floor no pipeline using it can go below."""
    texts = documents["text"]
    backend = tokenizer.backend_tokenizer
    for start in range(0, len(texts), RUN_CLM_BATCH):
        backend.encode_batch_fast(texts[start: start + RUN_CLM_BATCH], add_special_tokens=False)


# ----------------------------------------------------------------------------------------------------------
# Checks


def flat(dataset: Dataset, column: str = "input_ids") -> np.ndarray:
    return pc.list_flatten(dataset.data.column(column)).to_numpy(zero_copy_only=False).astype(np.int64)


def lengths(dataset: Dataset, column: str = "input_ids") -> np.ndarray:
    return pc.list_value_length(dataset.data.column(column)).to_numpy(zero_copy_only=False)


def run_clm_expected_blocks(stream: np.ndarray, doc_lengths: np.ndarray, block_size: int) -> np.ndarray:
    """The stream as group_texts leaves it: each 1000-document batch cut on its own, its tail dropped."""
    ends = np.cumsum(doc_lengths)
    kept, start = [], 0
    for stop in ends[RUN_CLM_BATCH - 1:: RUN_CLM_BATCH].tolist() + [int(ends[-1])]:
        if stop > start:
            kept.append(stream[start: start + (stop - start) // block_size * block_size])
        start = stop
    return np.concatenate(kept)


def check_outputs(baseline_tokens: Dataset, baseline_blocks: Dataset, igea_tokens: Dataset,
                  igea_blocks: Dataset, stats: dict[str, int], block_size: int,
                  pad_id: int | None) -> dict[str, Any]:
    """Same stream before cutting; each pipeline's blocks are exactly that stream cut its own way."""
    stream = flat(baseline_tokens)
    igea_flat = flat(igea_blocks)
    baseline_flat = flat(baseline_blocks)
    expected_baseline = run_clm_expected_blocks(stream, lengths(baseline_tokens), block_size)
    block_lengths = lengths(igea_blocks)
    return {
        "same_stream": bool(np.array_equal(stream, flat(igea_tokens))),
        "igea_blocks_exact": bool(np.array_equal(igea_flat, stream[: len(igea_flat)])
                                  and stats["tokens"] == len(stream)
                                  and stats["tokens"] == stats["blocks"] * block_size + stats["remainder"]),
        "run_clm_blocks_exact": bool(np.array_equal(baseline_flat, expected_baseline)),
        "padding_tokens": int((block_size - block_lengths).sum()
                              + (0 if pad_id is None else (igea_flat == pad_id).sum())),
        "tokens": len(stream),
        "igea_dropped": stats["remainder"],
        "run_clm_dropped": len(stream) - len(baseline_flat),
    }


# ----------------------------------------------------------------------------------------------------------
# Timing and report


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="folder of .jsonl files with `text`")
    parser.add_argument("--tokens", type=int, default=5_000_000, help="repeat the texts to at least this")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--boundary", choices=["eos", "special_tokens"], default="eos")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each pipeline; the best is reported")
    parser.add_argument("--threads", type=int, default=1, help="tokenizer worker threads (RAYON_NUM_THREADS)")
    parser.add_argument("--quick", action="store_true", help="200k tokens, vocab 4096, one run (for CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.vocab_size, args.repeats = 200_000, 4096, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # read when the tokenizer first runs in parallel
    datasets.disable_caching()
    datasets.disable_progress_bars()
    texts = read_texts(args.data)
    tokenizer = train_bpe_tokenizer(texts, args.vocab_size)
    documents = repeated_corpus(texts, tokenizer, args.tokens)
    print(f"{len(documents)} documents, tokenizer vocab {len(tokenizer)} (asked {args.vocab_size}), "
          f"block {args.block_size}, boundary {args.boundary}, {args.threads} thread(s), best of {args.repeats}")

    times: dict[str, list[float]] = {step: [] for step in STEPS}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.repeats):  # interleaved, so a busy moment on a shared machine hits both
            seconds, baseline_tokens = timed(run_clm_tokenize, documents, tokenizer, args.boundary)
            times["run_clm_tokenize"].append(seconds)
            seconds, baseline_blocks = timed(run_clm_group, baseline_tokens, args.block_size)
            times["run_clm_group"].append(seconds)
            seconds, igea_tokens = timed(igea_tokenize, documents, tokenizer, args.boundary)
            times["igea_tokenize"].append(seconds)
            seconds, (igea_blocks, stats) = timed(igea_pack, igea_tokens, args.block_size, scratch)
            times["igea_pack"].append(seconds)
            times["tokenizer_alone"].append(timed(tokenizer_alone, documents, tokenizer)[0])
        checks = check_outputs(baseline_tokens, baseline_blocks, igea_tokens, igea_blocks, stats,
                               args.block_size, tokenizer.pad_token_id)
    return report(times, checks, args)


def report(times: dict[str, list[float]], checks: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    best = {name: min(values) for name, values in times.items()}
    baseline_s = min(map(sum, zip(times["run_clm_tokenize"], times["run_clm_group"], strict=True)))
    igea_s = min(map(sum, zip(times["igea_tokenize"], times["igea_pack"], strict=True)))
    tokens = checks["tokens"]
    result = {
        "benchmark": "pipeline", "tokens": tokens, "block_size": args.block_size, "boundary": args.boundary,
        "threads": args.threads,
        "run_clm_s": round(baseline_s, 3), "igea_s": round(igea_s, 3),
        "run_clm_tokens_per_s": round(tokens / baseline_s), "igea_tokens_per_s": round(tokens / igea_s),
        "ratio": round(baseline_s / igea_s, 3),
        "ceiling_ratio": round(baseline_s / best["tokenizer_alone"], 3),
        "steps_s": {name: round(value, 3) for name, value in best.items()},
        **checks,
    }
    print(f"run_clm   {result['run_clm_tokens_per_s']:>12,} tokens/s  ({baseline_s:.2f} s)")
    print(f"igea      {result['igea_tokens_per_s']:>12,} tokens/s  ({igea_s:.2f} s)")
    print(f"ratio     {result['ratio']:.2f}x  (tokenizing alone caps it at {result['ceiling_ratio']:.2f}x)")
    print("steps (best, s): " + ", ".join(f"{k} {v}" for k, v in result["steps_s"].items()))
    print(f"checks: same stream {checks['same_stream']}, igea blocks exact {checks['igea_blocks_exact']}, "
          f"run_clm blocks exact {checks['run_clm_blocks_exact']}, padding {checks['padding_tokens']}, "
          f"dropped igea {checks['igea_dropped']} / run_clm {checks['run_clm_dropped']} tokens")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
