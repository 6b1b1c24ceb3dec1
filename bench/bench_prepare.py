"""Preparation at corpus scale: `prepare_dataset` on 1x, 10x and 100x the shared abstracts, against the tokenizer alone.

The corpus is the shared ncbi-disease-it abstracts (one JSON line each) repeated: 1x holds at least `--tokens`
tokens (5M), so 100x holds at least 500M. Each preparation runs in a fresh process (its own cache directory, the
tokenizer trained here, TOKENIZERS_PARALLELISM=false so `num_proc` is the number of cores used) while this
process samples the resident memory of its whole process tree. Recorded per run: wall time of
`prepare_dataset`, tokens/s, peak RSS (the tree's sum, and the main process's own peak), disk of the prepared
blocks against tokens x bytes per id, and a second `prepare_dataset` that must load instead of tokenizing.

The ceiling is the tokenizer alone on the same cores: `num_proc` forked processes, each running the backend's
`encode_batch_fast` over its share of the 1x texts already in memory (batches of 1000, nothing else).

    python bench/bench_prepare.py            # 1x/10x/100x with num_proc 2, 1x/10x with num_proc 1 (~10 min idle)
    python bench/bench_prepare.py --quick    # 1x = 100k tokens, 1x/2x, vocab 4096 (seconds, for CI)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ncbi-disease-it"
CARD_TOKENS = 6.2e9  # IVN-RIN/BioBERT_Italian with Minerva's tokenizer, as the card reports it
CARD_CORES = 16
BLOCK_SIZE = 2048


def abstract_lines(data_dir: Path) -> list[str]:
    """The JSON lines of every .jsonl file in `data_dir` (each holds one abstract's `text`)."""
    files = sorted(data_dir.glob("*.jsonl"))
    if not files:
        raise SystemExit(f"no .jsonl files in {data_dir}; pass --data DIR")
    return [line for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_corpus(path: Path, lines: list[str], copies: int) -> None:
    chunk = ("\n".join(lines) + "\n").encode("utf-8")
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(chunk)


# ----------------------------------------------------------------------------------------------------------
# What runs in a fresh process


def child_prepare(job: dict[str, Any]) -> dict[str, Any]:
    """`prepare_dataset` on one corpus (timed), then again (it must load), with its counts and disk."""
    import datasets
    from transformers import AutoTokenizer

    from igea.config import config_from_dict
    from igea.data import prepare_dataset

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
    cfg = config_from_dict({
        "model": {"name_or_path": job["tokenizer"]},
        "data": {"path": job["corpus"], "block_size": job["block_size"], "validation_split": 0.05,
                 "num_proc": job["num_proc"], "cache_dir": job["cache_dir"]},
        "training": {"output_dir": str(Path(job["cache_dir"]) / "run")},
    })
    before = cpu_seconds()
    start = time.perf_counter()
    data = prepare_dataset(cfg, tokenizer)
    seconds = time.perf_counter() - start
    main_cpu, workers_cpu = (after - earlier for after, earlier in zip(cpu_seconds(), before, strict=True))
    start = time.perf_counter()
    again = prepare_dataset(cfg, tokenizer)
    reload_s = time.perf_counter() - start
    splits = [data.stats["train"], data.stats["validation"]]
    tokens = sum(s["tokens"] for s in splits)
    [directory] = data.stats["prepared"]["dirs"]
    manifest = json.loads((Path(directory) / "prepared.json").read_text(encoding="utf-8"))
    bytes_per_id = 2 if data.stats["prepared"]["token_dtype"] == "uint16" else 4
    disk = sum(p.stat().st_size for p in Path(directory).iterdir())
    return {
        "tokens": tokens, "documents": sum(s["documents"] for s in splits), "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds), "build_s": manifest["seconds"],
        "main_cpu_s": round(main_cpu, 3), "cpu_s": round(main_cpu + workers_cpu, 3),
        "tokens_per_cpu_s": round(tokens / (main_cpu + workers_cpu)),
        "main_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "token_dtype": data.stats["prepared"]["token_dtype"], "disk_bytes": disk,
        "disk_ratio": round(disk / (tokens * bytes_per_id), 4),
        "blocks_exact": all(s["tokens"] == s["blocks"] * job["block_size"] + s["remainder"] for s in splits),
        "first_cache": data.stats["cache"], "second_cache": again.stats["cache"], "reload_s": round(reload_s, 3),
    }


def cpu_seconds() -> tuple[float, float]:
    """CPU time (user + system) of this process, and of its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _encode_share(share: int) -> tuple[int, float]:
    texts, backend, parts = _CEILING
    step = math.ceil(len(texts) / parts)
    mine = texts[share * step: (share + 1) * step]
    tokens, start_cpu = 0, time.process_time()
    for start in range(0, len(mine), 1000):
        encodings = backend.encode_batch_fast(mine[start: start + 1000], add_special_tokens=False)
        tokens += sum(len(e.ids) for e in encodings)
    return tokens, time.process_time() - start_cpu


def child_ceiling(job: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer's batch encode alone over the 1x texts, in `num_proc` forked processes; best of `repeats`."""
    import multiprocessing

    from transformers import AutoTokenizer

    from igea.blockstore import DocumentEncoder

    global _CEILING
    texts = [json.loads(line)["text"].strip() for line in Path(job["corpus"]).read_text(encoding="utf-8").splitlines()]
    backend = DocumentEncoder(AutoTokenizer.from_pretrained(job["tokenizer"]), "eos").backend  # as prepare uses it
    results = {}
    for num_proc in job["num_procs"]:
        _CEILING = (texts, backend, num_proc)
        best, best_cpu = math.inf, math.inf
        with multiprocessing.get_context("fork").Pool(num_proc) as pool:
            for _ in range(job["repeats"]):
                start = time.perf_counter()
                shares = pool.map(_encode_share, range(num_proc))
                best = min(best, time.perf_counter() - start)
                best_cpu = min(best_cpu, sum(cpu for _, cpu in shares))
        tokens = sum(n for n, _ in shares) + len(texts)  # + one EOS a document, as prepared
        results[str(num_proc)] = {"tokens": tokens, "seconds": round(best, 3), "tokens_per_s": round(tokens / best),
                                  "tokens_per_cpu_s": round(tokens / best_cpu)}
    return results


_CEILING: tuple = ()


# ----------------------------------------------------------------------------------------------------------
# The parent: corpora, fresh processes, memory sampling, the table


def run_child(mode: str, job: dict[str, Any]) -> dict[str, Any]:
    """Run `mode` in a fresh process; its result, with the peak RSS summed over its process tree."""
    import psutil

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    child = subprocess.Popen([sys.executable, __file__, "--child", mode, json.dumps(job)], env=env,
                             stdout=subprocess.PIPE, text=True)
    process, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            tree = [process, *process.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    out = child.stdout.read()
    if child.returncode != 0:
        raise SystemExit(f"{mode} failed (exit {child.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    if mode == "prepare":
        result["tree_peak_rss_mb"] = round(peak / 2**20, 1)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="folder of .jsonl files with `text`")
    parser.add_argument("--tokens", type=int, default=5_000_000, help="the 1x corpus holds at least this many")
    parser.add_argument("--scales", default="1,10,100", help="corpus sizes, in multiples of 1x")
    parser.add_argument("--num-proc", type=int, default=2, help="processes for every scale")
    parser.add_argument("--single-scales", default="1,10", help="scales also prepared with one process")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3, help="ceiling runs (the best is kept)")
    parser.add_argument("--scratch", type=Path, help="where corpora and caches go (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="1x = 100k tokens, 1x/2x, vocab 4096 (for CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.scales, args.single_scales, args.vocab_size, args.repeats = 100_000, "1,2", "1", 4096, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from igea.modeling import train_bpe_tokenizer

    lines = abstract_lines(args.data)
    texts = [json.loads(line)["text"] for line in lines]
    tokenizer = train_bpe_tokenizer(texts, args.vocab_size)
    per_copy = sum(len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    copies = math.ceil(args.tokens / per_copy)
    scales = [int(s) for s in args.scales.split(",")]
    single = [int(s) for s in args.single_scales.split(",") if s]
    load = os.getloadavg()
    print(f"tokenizer vocab {len(tokenizer)} (asked {args.vocab_size}); 1x = {copies} copies of {len(lines)} abstracts "
          f"({copies * per_copy:,} tokens); {os.cpu_count()} CPUs, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
          flush=True)

    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        root = Path(scratch)
        tokenizer.save_pretrained(root / "tokenizer")
        job = {"tokenizer": str(root / "tokenizer"), "block_size": BLOCK_SIZE}
        write_corpus(root / "x1.jsonl", lines, copies)
        ceiling = run_child("ceiling", {**job, "corpus": str(root / "x1.jsonl"), "repeats": args.repeats,
                                        "num_procs": sorted({1, args.num_proc})})
        runs = []
        plan = [(s, args.num_proc) for s in scales] + [(s, 1) for s in single if args.num_proc != 1]
        for scale, num_proc in sorted(plan, key=lambda p: (p[0], -p[1])):
            corpus = root / f"x{scale}.jsonl"
            if not corpus.exists():
                write_corpus(corpus, lines, copies * scale)
            result = run_child("prepare", {**job, "corpus": str(corpus), "num_proc": num_proc,
                                           "cache_dir": str(root / f"cache-{scale}-{num_proc}")})
            result.update(scale=scale, num_proc=num_proc, load=round(os.getloadavg()[0], 2))
            runs.append(result)
            print(json.dumps({"benchmark": "prepare", **result}), flush=True)
            if not any(s == scale for s, n in plan if n != num_proc):
                corpus.unlink()
        ceiling_again = ceiling if args.quick else run_child(
            "ceiling", {**job, "corpus": str(root / "x1.jsonl"), "repeats": args.repeats,
                        "num_procs": sorted({1, args.num_proc})})
    return report(runs, ceiling, ceiling_again, args, len(tokenizer))


def report(runs: list[dict], ceiling: dict, ceiling_again: dict, args: argparse.Namespace,
           vocab: int) -> dict[str, Any]:
    by = {(r["scale"], r["num_proc"]): r for r in runs}
    scales = sorted({r["scale"] for r in runs})
    low, high, n = scales[0], scales[-1], args.num_proc
    middle = scales[-2] if len(scales) > 2 else low
    single = max((s for s, p in by if p == 1 and (s, n) in by), default=None)
    best_ceiling = {k: max(ceiling[k]["tokens_per_s"], ceiling_again[k]["tokens_per_s"]) for k in ceiling}
    cpu_ceiling = {k: max(ceiling[k]["tokens_per_cpu_s"], ceiling_again[k]["tokens_per_cpu_s"]) for k in ceiling}
    for r in runs:
        r["ceiling_ratio"] = round(r["tokens_per_s"] / best_ceiling[str(r["num_proc"])], 3)
        r["ceiling_cpu_ratio"] = round(r["tokens_per_cpu_s"] / cpu_ceiling[str(r["num_proc"])], 3)
    top = by[(high, n)]
    # 16 cores busy with the measured CPU seconds per token, unless the one main process (reading, cleaning,
    # writing) cannot feed them: CPU time, so the projection does not depend on this machine's load
    main_rate = top["tokens"] / top["main_cpu_s"]
    card_rate = min(CARD_CORES * top["tokens_per_cpu_s"], main_rate)
    summary = {
        "benchmark": "prepare_summary", "vocab": vocab, "num_proc": n, "ceiling_tokens_per_s": best_ceiling,
        "ceiling_tokens_per_cpu_s": cpu_ceiling,
        "linear": round(top["tokens_per_s"] / by[(low, n)]["tokens_per_s"], 3),
        "linear_cpu": round(top["tokens_per_cpu_s"] / by[(low, n)]["tokens_per_cpu_s"], 3),
        "rss_growth": round(top["tree_peak_rss_mb"] / by[(middle, n)]["tree_peak_rss_mb"], 3),
        "disk_ratio": max(r["disk_ratio"] for r in runs),
        "ceiling_ratio": min(r["ceiling_ratio"] for r in runs),
        "ceiling_cpu_ratio": min(r["ceiling_cpu_ratio"] for r in runs),
        "speedup": round(by[(single, n)]["tokens_per_s"] / by[(single, 1)]["tokens_per_s"], 3) if single else None,
        "all_exact": all(r["blocks_exact"] for r in runs),
        "tokenized_once": all(r["first_cache"] == "built" and r["second_cache"] == "loaded" for r in runs),
        "uint16": all(r["token_dtype"] == "uint16" for r in runs),
        "card_projection": {
            "tokens": CARD_TOKENS, "cores": CARD_CORES, "tokens_per_s": round(card_rate),
            "bound_by": "main process" if card_rate == main_rate else "workers",
            "hours": round(CARD_TOKENS / card_rate / 3600, 2),
            "blocks_gb": round(CARD_TOKENS * 2 * top["disk_ratio"] / 1e9, 1),
            "peak_disk_gb": round(CARD_TOKENS * 2 * (1 + top["disk_ratio"]) / 1e9, 1),
        },
    }
    print(f"\n{'scale':>5} {'procs':>5} {'tokens':>13} {'seconds':>8} {'tokens/s':>11} {'vs ceiling':>10} "
          f"{'tokens/cpu-s':>12} {'vs ceiling':>10} {'tree RSS MB':>11} {'main RSS MB':>11} {'disk/(tokens x 2)':>17} "
          f"{'load':>5}")
    for r in runs:
        print(f"{r['scale']:>4}x {r['num_proc']:>5} {r['tokens']:>13,} {r['seconds']:>8.1f} {r['tokens_per_s']:>11,} "
              f"{r['ceiling_ratio']:>10.3f} {r['tokens_per_cpu_s']:>12,} {r['ceiling_cpu_ratio']:>10.3f} "
              f"{r['tree_peak_rss_mb']:>11.1f} {r['main_peak_rss_mb']:>11.1f} {r['disk_ratio']:>17.4f} {r['load']:>5}")
    print(f"ceiling (tokenizer alone, best of {args.repeats}, before / after): "
          + ", ".join(f"{k} proc {ceiling[k]['tokens_per_s']:,} / {ceiling_again[k]['tokens_per_s']:,} tokens/s"
                      for k in ceiling))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        mode, job = sys.argv[2], json.loads(sys.argv[3])
        print(json.dumps(child_prepare(job) if mode == "prepare" else child_ceiling(job)))
    else:
        main()
