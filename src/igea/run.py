"""The whole job a config describes: train, print generated samples, write the run's model card."""

from __future__ import annotations

import json
import logging

from igea.config import IgeaConfig
from igea.generate import Generator
from igea.report import write_report
from igea.train import RunResult, train, write_json_atomic

logger = logging.getLogger(__name__)


def run(cfg: IgeaConfig, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Continue pretraining as configured, generate one sample per configured prompt, write README.md."""
    result = train(cfg, resume=resume, overwrite=overwrite)
    if cfg.generation.prompts:
        result.metrics["samples"] = generate_samples(cfg, result)
        save_metrics(result)
    write_report(result.output_dir)
    return result


def generate_samples(cfg: IgeaConfig, result: RunResult) -> dict[str, str]:
    """One continuation (with its prompt) per configured prompt, from the trained model."""
    generator = Generator.from_pretrained(str(result.output_dir), config=cfg.generation)
    return {prompt: generator.generate(prompt, full_text=True)[0] for prompt in cfg.generation.prompts}


def save_metrics(result: RunResult) -> None:
    """Rewrite metrics.json with what was added after training (samples, benchmarks)."""
    path = result.output_dir / "metrics.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    write_json_atomic(path, {**saved, **result.metrics})
