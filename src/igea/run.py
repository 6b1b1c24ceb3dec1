"""The whole job a config describes: train, print generated samples, write the run's model card."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from accelerate import PartialState

from igea.config import IgeaConfig
from igea.evaluate import load_for_eval
from igea.generate import Generator
from igea.progress import timed
from igea.report import write_report
from igea.rundir import write_json_atomic
from igea.runstart import RunStart
from igea.tasks import run_tasks
from igea.train import RunResult, mark_finished, open_run, train_started

logger = logging.getLogger(__name__)


def run(cfg: IgeaConfig, resume: bool | Literal["auto"] = False, overwrite: bool = False,
        allow_config_change: bool = False) -> RunResult:
    """Continue pretraining as configured (see `igea.train` for the flags), generate one sample per configured
    prompt, score the `eval.tasks` benchmarks, mark the run finished and write its model card."""
    with open_run(cfg, resume, overwrite, allow_config_change) as start:
        result = train_started(cfg, start, finish=False)
        if not PartialState().is_main_process:  # one process samples and writes the card
            return result
        if cfg.generation.prompts:
            with said(start, f"generating {len(cfg.generation.prompts)} sample(s)", "generated"):
                result.metrics["samples"] = generate_samples(cfg, result)
        if cfg.eval.tasks:
            with said(start, f"scoring the trained model on {', '.join(map(str, cfg.eval.tasks))}", "scored"):
                result.metrics["benchmarks"] = run_benchmarks(cfg, result)
        save_metrics(result)
        mark_finished(cfg, result, start)
        write_report(result.output_dir)
    return result


@contextmanager
def said(start: RunStart, what: str, done: str) -> Iterator[None]:
    """`what` in the log and the run's status as it starts, `<done> in 12 s` when it ends."""
    if start.status is not None:
        start.status.update(phase=what)
    with timed(logger, what, done=done):
        yield


def generate_samples(cfg: IgeaConfig, result: RunResult) -> dict[str, str]:
    """One continuation (with its prompt) per configured prompt, from the trained model."""
    generator = Generator.from_pretrained(str(result.output_dir), config=cfg.generation)
    prompts = cfg.generation.prompts
    texts = generator.generate(prompts, full_text=True, num_return_sequences=1)  # all prompts in one batch
    return dict(zip(prompts, texts, strict=True))


def run_benchmarks(cfg: IgeaConfig, result: RunResult) -> dict[str, dict]:
    """Score the trained model on the `eval.tasks` benchmarks; per-question predictions go to benchmarks.json."""
    model, tokenizer = load_for_eval(str(result.output_dir), None)
    scores = run_tasks(model, tokenizer, cfg.eval.tasks, cfg.eval)
    write_json_atomic(result.output_dir / "benchmarks.json", scores)
    return {name: {k: v for k, v in score.items() if k != "predictions"} for name, score in scores.items()}


def save_metrics(result: RunResult) -> None:
    """Rewrite metrics.json with what was added after training (samples, benchmarks)."""
    path = result.output_dir / "metrics.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    write_json_atomic(path, {**saved, **result.metrics})
