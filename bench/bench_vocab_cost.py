"""What `igea vocab` costs at a real shape: each phase's time for a 135M-parameter model, as a user runs it.

The model has SmolLM-135M's shape: a Llama of hidden 576, 30 layers, 9 attention heads (3 for keys and values),
intermediate 1536, tied embeddings, a byte-level BPE of 49,152 tokens; random weights (the time does not depend
on them). Its tokenizer is a byte-level BPE trained to 49,152 tokens on `wordfreq`'s English and Italian word
frequencies (English three times as much: an English-first tokenizer, as SmolLM's, that splits Italian medical
words into many pieces). The corpus is the shared Italian PubMed abstracts (`train` and `dev`, 693), the held-out
text `test` (100). `igea vocab ... --num-tokens 1000` runs in a subprocess with its stderr to a file, as in a
scheduler's log; each phase's time is read from the log's `... in <time>` lines.

    python bench/bench_vocab_cost.py                         # the default on this machine (a CPU)
    python bench/bench_vocab_cost.py --fit-documents 0 100   # one run per value of --fit-documents
    python bench/bench_vocab_cost.py --quick                 # a tiny shape, for CI (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from igea.modeling import train_bpe_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ncbi-disease-it"
END_LINE = re.compile(r"^\d\d:\d\d:\d\d [\w.]+: (?P<phase>.+?)(?:: done)? in (?P<time>[\d.]+ s|\d+m\d\ds|\d+h\d\dm)$")


def seconds(text: str) -> float:
    """A duration as igea.progress writes it (`4.2 s`, `42 s`, `2m58s`, `1h02m`) in seconds."""
    if text.endswith(" s"):
        return float(text[:-2])
    if "h" in text:
        hours, minutes = text.rstrip("m").split("h")
        return int(hours) * 3600 + int(minutes) * 60
    minutes, secs = text.rstrip("s").split("m")
    return int(minutes) * 60 + int(secs)


def phase_times(log: str) -> dict[str, float]:
    """Each phase's seconds, from the lines that end one (`<phase>: done in 2m58s`, `model loaded in 3.1 s`)."""
    return {m["phase"]: seconds(m["time"]) for m in map(END_LINE.match, log.splitlines()) if m}


def words_text(words: int):
    """Space-separated English and Italian words drawn by wordfreq's frequencies, English three times as much."""
    import wordfreq

    for language, share in (("en", 0.75), ("it", 0.25)):
        for word, frequency in wordfreq.get_frequency_dict(language, "large").items():
            count = round(frequency * words * share)
            if count < 1:
                break
            yield " ".join([word] * count)


def build_model(work: Path, args: argparse.Namespace) -> Path:
    """The random model of the asked shape with its byte-level tokenizer, saved in `work` (reused when there)."""
    out = work / f"model-{args.hidden_size}x{args.layers}-{args.vocab_size}-{args.dtype}"
    if (out / "config.json").is_file():
        return out
    start = time.perf_counter()
    tokenizer = train_bpe_tokenizer(words_text(args.tokenizer_words), args.vocab_size)
    print(f"tokenizer: {len(tokenizer)} tokens in {time.perf_counter() - start:.0f} s", flush=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_vocab(model: Path, work: Path, fit_documents: int | None, args: argparse.Namespace) -> dict[str, Any]:
    """`igea vocab` on the corpus, stderr to a log file; its phases' times and its report."""
    name = "default" if fit_documents is None else str(fit_documents)
    out, log = work / f"vocab-{name}", work / f"vocab-{name}.log"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    command = [sys.executable, "-m", "igea", "vocab", str(model), "--corpus", str(args.data / "train.jsonl"),
               str(args.data / "dev.jsonl"), "--heldout", str(args.data / "test.jsonl"),
               "--num-tokens", str(args.num_tokens), "--output", str(out)]
    if fit_documents is not None:
        command += ["--fit-documents", str(fit_documents)]
    if args.bits_per_byte_documents is not None:
        command += ["--bits-per-byte-documents", str(args.bits_per_byte_documents)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with log.open("w") as stderr:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    wall = time.perf_counter() - start
    text = log.read_text(encoding="utf-8")
    if done.returncode:
        raise SystemExit(f"igea vocab failed:\n{text[-3000:]}")
    report = json.loads((out / "igea_vocab.json").read_text(encoding="utf-8"))
    lines = text.splitlines()
    longest_gap = max(gap(a, b) for a, b in zip(lines, lines[1:], strict=False)) if len(lines) > 1 else 0
    return {"fit_documents": fit_documents, "wall_s": round(wall, 1), "phases_s": phase_times(text),
            "fit": report["fit"], "fitted_tokens": report["fitted_tokens"],
            "distillation": report["distillation"], "bits_per_byte": report.get("bits_per_byte"),
            "tokens_added": report["tokens_added"], "log_lines": len(lines), "longest_silence_s": longest_gap,
            "log": str(log)}


def gap(first: str, second: str) -> int:
    """Seconds between two log lines' `HH:MM:SS` stamps (0 for a line without one)."""
    def stamp(line: str) -> int | None:
        m = re.match(r"(\d\d):(\d\d):(\d\d) ", line)
        return int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]) if m else None

    a, b = stamp(first), stamp(second)
    return (b - a) % 86400 if a is not None and b is not None else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="folder with train/dev/test.jsonl (`text`)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/igea-bench-vocab-cost"),
                        help="where the model (reused across runs) and the outputs go")
    parser.add_argument("--fit-documents", type=int, nargs="*", default=[None],
                        help="values of --fit-documents, one run each (default: one run with igea's default)")
    parser.add_argument("--num-tokens", type=int, default=1000)
    parser.add_argument("--hidden-size", type=int, default=576)
    parser.add_argument("--intermediate-size", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=49152)
    parser.add_argument("--tokenizer-words", type=int, default=50_000_000,
                        help="word occurrences the tokenizer is trained on")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the checkpoint's dtype, which igea vocab loads it in")
    parser.add_argument("--bits-per-byte-documents", type=int, help="passed to igea vocab (default: its own)")
    parser.add_argument("--quick", action="store_true", help="a tiny shape (for CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden_size, args.intermediate_size, args.layers, args.heads, args.kv_heads = 32, 64, 2, 4, 2
        args.vocab_size, args.tokenizer_words, args.num_tokens = 2000, 200_000, 50
        args.bits_per_byte_documents = args.bits_per_byte_documents or 10
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    model = build_model(args.work, args)
    parameters = LlamaForCausalLM.from_pretrained(model).num_parameters()
    results = []
    for fit_documents in args.fit_documents:
        result = {"benchmark": "vocab_cost", "parameters": parameters, "dtype": args.dtype,
                  "vocab_size": len(AutoTokenizer.from_pretrained(model)), "hidden_size": args.hidden_size,
                  "layers": args.layers, "threads": torch.get_num_threads(),
                  **run_vocab(model, args.work, fit_documents, args)}
        print("; ".join(f"{k} {v:.1f} s" for k, v in result["phases_s"].items()), flush=True)
        print(json.dumps(result, ensure_ascii=False), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
