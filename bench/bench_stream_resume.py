"""Time to the first new training step when a streamed run resumes early and late (goal: <= 1.5x apart).

One streamed run (`data.streaming: true`, a tiny Mistral, the shared Italian abstracts repeated until the
stream outlasts the run) trains LATE + 1 steps and checkpoints every EARLY steps. Each measurement copies one
checkpoint into a fresh run directory and starts `igea train --resume` in its own process: the time runs
from the process start to the log line of the first new step, then the process is stopped. igea continues
the stream from the position saved in the checkpoint, so resuming at step LATE should cost what resuming
at step EARLY costs. For contrast, the same resumes with that position removed from the checkpoint: the
Trainer then replays the stream up to the checkpoint (what `--resume` did before), re-reading and
re-tokenizing everything before it. Runs are interleaved; the best of `--repeats` is reported.

A process start on a shared 2-core CPU swings by seconds, so the stream's own part is also timed in one
process: from a checkpoint's saved position to the first block, against handing out every block before it
again (the replay), best of `--repeats`.

What a resume still does in proportion to its position: the `datasets` reader skips the documents before
the saved position without tokenizing them, but reads the raw file up to there. The last part measures that
rate: the corpus repeated to `--skim-mb` of text, read as igea reads it, then resumed from 5% and from 95%
of it; the difference gives the MB/s at which a resume skims past already trained text.

    python bench/bench_stream_resume.py           # resume at step 10 and at step 200
    python bench/bench_stream_resume.py --quick   # at step 5 and at step 20 (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

from corpus import base_texts  # bench/corpus.py (the script's own folder is on sys.path)
from transformers import AutoTokenizer

import igea
from igea.config import TinyModelConfig
from igea.rundir import CHECKPOINT_MARKER
from igea.streaming import STATE_FILE


def write_corpus(path: Path, texts: list[str], model: Path, tokens: int) -> int:
    """The texts repeated until they hold at least `tokens` tokens (so the run stays in its first epoch)."""
    chunk = "\n".join(texts) + "\n"
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    per_copy = sum(len(ids) + 1 for ids in tokenizer(texts)["input_ids"])
    copies = -(-tokens // per_copy)
    path.write_text(chunk * copies, encoding="utf-8")
    return copies * per_copy


def write_config(path: Path, model: Path, corpus: Path, out: Path, shape: dict[str, int], steps: int,
                 save_steps: int) -> Path:
    path.write_text(
        f"model:\n  name_or_path: {model}\n"
        f"data:\n  path: {corpus}\n  streaming: true\n  validation_split: 0\n  block_size: {shape['block']}\n"
        f"  shuffle_buffer: {shape['window']}\n"
        f"training:\n  output_dir: {out}\n  max_steps: {steps}\n  per_device_train_batch_size: {shape['batch']}\n"
        f"  gradient_accumulation_steps: 1\n  save_steps: {save_steps}\n  save_total_limit: null\n  logging_steps: 1\n"
        "  use_cpu: true\n  disable_tqdm: true\n"
        "generation:\n  prompts: []\n"
    )
    return path


def igea_train(config: Path, *extra: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "igea", "train", str(config), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # igea logs on stderr


def time_to_first_step(config: Path, run: Path, checkpoint: Path, keep_position: bool, log: Path) -> float:
    """Seconds from starting `igea train --resume` on a copy of `checkpoint` to its first new step's log line."""
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(checkpoint, run / checkpoint.name)
    if not keep_position:  # the checkpoint as igea wrote it before it saved stream positions
        (run / checkpoint.name / STATE_FILE).unlink()
        marker = run / checkpoint.name / CHECKPOINT_MARKER
        record = json.loads(marker.read_text(encoding="utf-8"))
        del record["files"][STATE_FILE]
        marker.write_text(json.dumps(record), encoding="utf-8")
    start = time.perf_counter()
    proc = igea_train(config, "--resume", log=log)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "  loss " in line:  # igea's log line of a training step: `step 6/21  loss 6.93 ...`
            elapsed = time.perf_counter() - start
            break
    else:
        proc.wait()
        log.write_text("".join(seen), encoding="utf-8")
        raise SystemExit(f"igea train --resume ended without a training step:\n{''.join(seen)[-3000:]}")
    proc.kill()  # the step is what was timed; the rest of the run is not needed
    proc.wait()
    log.write_text("".join(seen), encoding="utf-8")
    return elapsed


def stream_times(config: Path, checkpoints: dict[int, Path]) -> dict[str, dict[int, float]]:
    """Seconds to the first new block of each checkpoint: from its saved position, and by replaying the stream."""
    from igea import prepare_dataset
    from igea.config import load_config

    cfg = load_config(config)
    times: dict[str, dict[int, float]] = {"saved_position": {}, "replay": {}}
    for step, checkpoint in checkpoints.items():
        position = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        stream = prepare_dataset(cfg).train
        stream.load_position(position)
        start = time.perf_counter()
        next(iter(stream))
        times["saved_position"][step] = time.perf_counter() - start
        stream = prepare_dataset(cfg).train
        start = time.perf_counter()
        next(islice(stream, position["blocks"], None))
        times["replay"][step] = time.perf_counter() - start
    return times


def skim_rate(tmp: Path, texts: list[str], megabytes: float) -> dict[str, float]:
    """MB/s at which the document reader skips the text before a saved position (it does not tokenize it)."""
    from igea.config import DataConfig
    from igea.data import clean_corpus, load_corpus

    corpus = tmp / "skim.txt"
    chunk = ("\n".join(texts) + "\n").encode("utf-8")
    corpus.write_bytes(chunk * max(1, round(megabytes * 1e6 / len(chunk))))
    d = DataConfig(path=str(corpus), streaming=True)

    def documents():
        return clean_corpus(load_corpus(d), d)

    stream, states, read = documents(), [], 0
    size = corpus.stat().st_size
    marks = [0.05 * size, 0.95 * size]
    for batch in stream.iter(batch_size=256):
        read += sum(len(t.encode("utf-8")) + 1 for t in batch["text"])
        if marks and read >= marks[0]:
            states.append((read, stream.state_dict()))
            marks.pop(0)
    seconds = []
    for _, state in states:
        resumed = documents()
        resumed.load_state_dict(state)
        start = time.perf_counter()
        next(iter(resumed.iter(batch_size=256)))
        seconds.append(time.perf_counter() - start)
    skipped_mb, extra = (states[1][0] - states[0][0]) / 1e6, seconds[1] - seconds[0]
    return {"skim_file_mb": size / 1e6, "skim_at_5pct_s": seconds[0], "skim_at_95pct_s": seconds[1],
            "skim_mb_per_s": skipped_mb / extra if extra > 0 else None}  # None: too small a file to tell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resume at steps 5 and 20, small batches (smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed resumes per case (default 3, quick 1)")
    parser.add_argument("--skim-mb", type=float, default=None, help="text for the skim rate (default 200, quick 10)")
    args = parser.parse_args()
    early, late = (5, 20) if args.quick else (10, 200)
    shape = {"block": 128, "batch": 8, "window": 100} if args.quick else {"block": 256, "batch": 32, "window": 1000}
    repeats = args.repeats or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = base_texts()
        model = igea.build_tiny_model(texts, TinyModelConfig(vocab_size=1024), tmp / "model")
        needed = (late + 1) * shape["batch"] * shape["block"]
        corpus_tokens = write_corpus(tmp / "corpus.txt", texts, model, 2 * needed)
        config = write_config(tmp / "run.yaml", model, tmp / "corpus.txt", tmp / "run", shape, late + 1, early)
        output, _ = igea_train(config, log=tmp / "first.log").communicate()
        if "run saved in" not in output:
            raise SystemExit(f"igea train failed:\n{output[-3000:]}")
        resume_config = write_config(tmp / "resume.yaml", model, tmp / "corpus.txt", tmp / "resume", shape, late + 1,
                                     early)
        times: dict[str, dict[int, list[float]]] = {"saved_position": {early: [], late: []},
                                                    "replay": {early: [], late: []}}
        restored = {}
        checkpoints = {step: tmp / "run" / f"checkpoint-{step}" for step in (early, late)}
        stream_runs = [stream_times(resume_config, checkpoints) for _ in range(repeats)]
        for _ in range(repeats):
            for mode in times:
                for step in (early, late):
                    log = tmp / f"{mode}-{step}.log"
                    times[mode][step].append(time_to_first_step(resume_config, tmp / "resume",
                                                                tmp / "run" / f"checkpoint-{step}",
                                                                mode == "saved_position", log))
                    restored[(mode, step)] = "without replaying it" in log.read_text()
        skim = skim_rate(tmp, texts, args.skim_mb or (10 if args.quick else 200))
    best = {mode: {step: min(t) for step, t in steps.items()} for mode, steps in times.items()}
    stream = {mode: {step: min(run[mode][step] for run in stream_runs) for step in (early, late)} for mode in times}
    for mode, steps in best.items():
        for step, seconds in steps.items():
            print(f"{mode:>15}: resume at step {step:>3} ({step * shape['batch']:>5} blocks before it): "
                  f"{seconds:6.2f} s to the first new step, {stream[mode][step]:6.2f} s of it to the first block")
    result = {
        "early_step": early, "late_step": late, **shape, "corpus_tokens": corpus_tokens, "repeats": repeats,
        "saved_position_s": best["saved_position"], "replay_s": best["replay"],
        "ratio": best["saved_position"][late] / best["saved_position"][early],
        "replay_ratio": best["replay"][late] / best["replay"][early],
        "stream_saved_position_s": stream["saved_position"], "stream_replay_s": stream["replay"],
        "stream_ratio": stream["saved_position"][late] / stream["saved_position"][early],
        "stream_replay_ratio": stream["replay"][late] / stream["replay"][early],
        "restored_from_saved_position": all(restored[("saved_position", s)] for s in (early, late)),
        "replayed_without_it": not any(restored[("replay", s)] for s in (early, late)), **skim,
    }
    print(f"ratio late / early with the saved position: {result['ratio']:.2f} (goal <= 1.5); "
          f"replaying: {result['replay_ratio']:.2f}; the stream alone: {result['stream_ratio']:.2f} and "
          f"{result['stream_replay_ratio']:.2f}")
    print(f"skimming already trained text on resume: {skim['skim_at_5pct_s']:.2f} s at 5%, "
          f"{skim['skim_at_95pct_s']:.2f} s at 95% of {skim['skim_file_mb']:.0f} MB ({skim['skim_mb_per_s']} MB/s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
