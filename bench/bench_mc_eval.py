"""Multiple-choice scoring with igea vs lm-evaluation-harness on the same model, task and requests.

A tiny Mistral is built here on the shared Italian abstracts; the task is a cloze test made of held-out
abstracts (an opening, continued by its own next words or by another abstract's). Both sides score the very
same (context, continuation) requests: lm-eval's HFLM `loglikelihood` (one sequence per choice) and igea's
`loglikelihoods` (one pass per prompt, then all choices over its key/value cache). The script prints both
wall times (best of --repeats, interleaved), their ratio and the largest log-likelihood difference, then one
end-to-end run of each (`lm_eval.simple_evaluate` vs `igea.tasks.run_tasks`, task file to accuracy), igea
reading both its own task file and lm-eval's.

    python bench/bench_mc_eval.py            # 100 questions x 4 choices, 0- and 5-shot
    python bench/bench_mc_eval.py --quick    # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import igea
from igea.config import EvalConfig, TinyModelConfig
from igea.tasks import load_task, loglikelihoods, run_tasks

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ncbi-disease-it"
FULL_SHAPE = TinyModelConfig(vocab_size=2048, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=4, intermediate_size=768, max_position_embeddings=1024)
QUICK_SHAPE = TinyModelConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512)
QUESTION_WORDS, ENDING_WORDS = 24, 10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 questions, 0/1-shot, smaller model, 1 run")
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--shots", default="0,5", help="comma-separated few-shot counts to time")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per batch (igea), and lm-eval's")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side (best of)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier when shared)")
    parser.add_argument("--workdir", help="where model and task files go (default: a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.questions, args.shots, args.repeats = 12, "0,1", 1
    args.shots = [int(s) for s in args.shots.split(",")]
    return args


def read_texts(split: str) -> list[str]:
    path = DATA / f"{split}.jsonl"
    if not path.is_file():
        sys.exit(f"bench_mc_eval: {path} is missing (the shared ncbi-disease-it data)")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def cloze_rows(texts: list[str], count: int) -> list[dict]:
    """An abstract's opening, continued by its own next words (right) or 3 others' (other lengths)."""
    words = [t.split() for t in texts if len(t.split()) >= QUESTION_WORDS + ENDING_WORDS + 3]
    rows = []
    for i in range(count):
        picks = [words[(i + k * 7) % len(words)] for k in range(4)]
        ends = [QUESTION_WORDS + ENDING_WORDS - 2 + k for k in range(4)]
        endings = [" ".join(w[QUESTION_WORDS:end]) for w, end in zip(picks, ends, strict=True)]
        gold = i % 4
        endings.insert(gold, endings.pop(0))
        rows.append({"question": " ".join(picks[0][:QUESTION_WORDS]), "choices": endings, "answer": gold})
    return rows


def write_task(workdir: Path, questions: int) -> tuple[Path, Path]:
    """The cloze task as an igea task file and as an lm-eval task directory, over the same jsonl files."""
    files = {}
    for split, texts, count in (("test", read_texts("dev") + read_texts("test"), questions),
                                ("train", read_texts("train"), 8)):
        files[split] = workdir / f"cloze_{split}.jsonl"
        rows = cloze_rows(texts, count)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        files[split].write_text(text, encoding="utf-8")
    igea_task = workdir / "cloze.yaml"
    igea_task.write_text(yaml.safe_dump({"path": str(files["test"]), "fewshot_path": str(files["train"])}))
    lm_eval_dir = workdir / "lm_eval_tasks"
    lm_eval_dir.mkdir(exist_ok=True)
    (lm_eval_dir / "cloze.yaml").write_text(yaml.safe_dump({
        "task": "cloze", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
        "output_type": "multiple_choice", "test_split": "test", "training_split": "train",
        "fewshot_config": {"sampler": "first_n"}, "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "choices", "doc_to_target": "answer",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }))
    return igea_task, lm_eval_dir


def best_times(first: Callable[[], object], second: Callable[[], object], repeats: int):
    """Best wall time of each function over `repeats` interleaved runs, and each one's last result."""
    times: tuple[list[float], list[float]] = ([], [])
    results = [None, None]
    for _ in range(repeats):
        for k, fn in enumerate((first, second)):
            start = time.perf_counter()
            results[k] = fn()
            times[k].append(time.perf_counter() - start)
    return min(times[0]), min(times[1]), results[0], results[1]


def same_predictions(ours: list[list[float]], theirs: list[tuple[float, bool]]) -> tuple[float, bool]:
    """Largest log-likelihood difference, and whether every question's best choice is the same."""
    flat = [ll for row in ours for ll in row]
    diff = max(abs(a - b) for a, (b, _) in zip(flat, theirs, strict=True))
    same, start = True, 0
    for row in ours:
        theirs_row = [ll for ll, _ in theirs[start : start + len(row)]]
        same &= theirs_row.index(max(theirs_row)) == row.index(max(row))
        start += len(row)
    return diff, same


def time_scoring(lm, model, tokenizer, igea_task: Path, shots: int, args: argparse.Namespace) -> None:
    """lm-eval's `loglikelihood` vs igea's `loglikelihoods` on the task's requests; one printed row."""
    from lm_eval.api.instance import Instance

    requests = load_task(str(igea_task), num_fewshot=shots).requests()
    instances = [Instance("loglikelihood", {}, (ctx, cont), j)
                 for ctx, conts in requests for j, cont in enumerate(conts)]
    theirs_s, ours_s, theirs, ours = best_times(
        lambda: lm.loglikelihood(instances, disable_tqdm=True),
        lambda: loglikelihoods(model, tokenizer, requests, args.batch_size),
        args.repeats,
    )
    diff, same = same_predictions(ours, theirs)
    print(f"{f'cloze {shots}-shot':<22}{theirs_s:>10.2f}{ours_s:>9.2f}{theirs_s / ours_s:>8.2f}x"
          f"{diff:>11.1e}{str(same):>12}")


def time_end_to_end(
    lm, model, tokenizer, igea_task: Path, lm_eval_dir: Path, shots: int, batch_size: int
) -> None:
    """`lm_eval.simple_evaluate` vs `igea.tasks.run_tasks`, task file to acc_norm; one printed line."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(lm_eval_dir), include_defaults=False)
    start = time.perf_counter()
    theirs = simple_evaluate(model=lm, tasks=["cloze"], task_manager=manager, num_fewshot=shots)
    theirs_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = run_tasks(model, tokenizer, [str(igea_task)], EvalConfig(num_fewshot=shots, batch_size=batch_size))
    ours_s = time.perf_counter() - start
    start = time.perf_counter()  # lm-eval's own task file, read by igea
    same_file = run_tasks(model, tokenizer, [str(lm_eval_dir / "cloze.yaml")],
                          EvalConfig(num_fewshot=shots, batch_size=batch_size))
    same_file_s = time.perf_counter() - start
    print(f"end to end, {shots}-shot: simple_evaluate {theirs_s:.2f} s, run_tasks {ours_s:.2f} s, "
          f"speedup {theirs_s / ours_s:.2f}x; acc_norm {theirs['results']['cloze']['acc_norm,none']:.4f} "
          f"vs {ours['cloze']['acc_norm']:.4f}")
    print(f"end to end, {shots}-shot, lm-eval's task file: run_tasks {same_file_s:.2f} s, "
          f"speedup {theirs_s / same_file_s:.2f}x; acc_norm {same_file['cloze']['acc_norm']:.4f}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    if args.workdir:
        run(args, Path(args.workdir))
        return
    with tempfile.TemporaryDirectory(prefix="bench_mc_eval_") as workdir:
        run(args, Path(workdir))


def run(args: argparse.Namespace, workdir: Path) -> None:
    from lm_eval.models.huggingface import HFLM

    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    model_dir = igea.build_tiny_model(read_texts("train"), shape, workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    igea_task, lm_eval_dir = write_task(workdir, args.questions)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    size = model.num_parameters() / 1e6
    print(f"{args.questions} questions x 4 choices; tiny Mistral ({size:.1f}M parameters, "
          f"hidden {shape.hidden_size}, {shape.num_hidden_layers} layers, vocab {len(tokenizer)}); "
          f"batch {args.batch_size}; {torch.get_num_threads()} CPU thread(s); best of {args.repeats}")
    print(f"{'scoring':<22}{'lm-eval s':>10}{'igea s':>9}{'speedup':>9}{'max |dll|':>11}{'same preds':>12}")
    for shots in args.shots:
        time_scoring(lm, model, tokenizer, igea_task, shots, args)
    time_end_to_end(lm, model, tokenizer, igea_task, lm_eval_dir, args.shots[0], args.batch_size)


if __name__ == "__main__":
    main()
