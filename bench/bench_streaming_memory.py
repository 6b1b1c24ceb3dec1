"""Peak memory of a streamed run does not grow with the corpus: 1x vs 10x the corpus, same run length.

Each run is `igea train` in its own process (streaming, a tiny Mistral, a fixed number of steps); its peak
resident memory comes from the kernel (`os.wait4`). Prints both peaks and their ratio (goal: <= 1.2).

    python bench/bench_streaming_memory.py            # 1x = 20 MB of text, 10x = 200 MB
    python bench/bench_streaming_memory.py --quick    # 1x = 1 MB, 10x = 10 MB (a smoke run)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from corpus import base_texts  # bench/corpus.py (the script's own folder is on sys.path)

import igea
from igea.config import TinyModelConfig


def write_corpus(path: Path, texts: list[str], megabytes: float) -> Path:
    chunk = ("\n".join(texts) + "\n").encode("utf-8")
    copies = max(1, round(megabytes * 1e6 / len(chunk)))
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(chunk)
    return path


def write_config(path: Path, model: Path, corpus: Path, out: Path, steps: int) -> Path:
    path.write_text(
        f"model:\n  name_or_path: {model}\n"
        f"data:\n  path: {corpus}\n  streaming: true\n  validation_split: 50\n  block_size: 128\n"
        "  shuffle_buffer: 1000\n"
        f"training:\n  output_dir: {out}\n  max_steps: {steps}\n  per_device_train_batch_size: 8\n"
        f"  gradient_accumulation_steps: 1\n  eval_steps: {steps}\n  save_steps: {steps}\n  logging_steps: {steps}\n"
        "  use_cpu: true\n  disable_tqdm: true\n"
        "generation:\n  prompts: []\n"
    )
    return path


def peak_rss_mb(config: Path, log: Path) -> float:
    """Run `igea train CONFIG` and return its peak resident set size in MB (from the kernel's accounting)."""
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "igea", "train", str(config)],
                                stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"igea train failed:\n{log.read_text()[-2000:]}")
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small corpora and few steps (smoke run)")
    args = parser.parse_args()
    base_mb, steps = (1, 5) if args.quick else (20, 40)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = base_texts()
        model = igea.build_tiny_model(texts, TinyModelConfig(vocab_size=1024), tmp / "model")
        peaks = {}
        for scale in (1, 10):
            corpus = write_corpus(tmp / f"corpus-{scale}x.txt", texts, base_mb * scale)
            config = write_config(tmp / f"run-{scale}x.yaml", model, corpus, tmp / f"run-{scale}x", steps)
            peaks[scale] = peak_rss_mb(config, tmp / f"run-{scale}x.log")
            size = corpus.stat().st_size / 1e6
            print(f"{scale:>2}x corpus ({size:7.1f} MB of text), {steps} steps: peak RSS {peaks[scale]:7.1f} MB")
    print(f"ratio 10x / 1x: {peaks[10] / peaks[1]:.3f} (goal <= 1.2)")


if __name__ == "__main__":
    main()
