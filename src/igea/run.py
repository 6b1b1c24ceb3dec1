"""The whole job a config describes: train, then print generated samples (and write the run's report)."""

from __future__ import annotations

import logging

from igea.config import IgeaConfig
from igea.generate import Generator
from igea.train import RunResult, train

logger = logging.getLogger(__name__)


def run(cfg: IgeaConfig, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Continue pretraining as configured, then generate one sample per configured prompt."""
    result = train(cfg, resume=resume, overwrite=overwrite)
    if cfg.generation.prompts:
        generator = Generator.from_pretrained(str(result.output_dir), config=cfg.generation)
        result.metrics["samples"] = {
            prompt: generator.generate(prompt, full_text=True)[0] for prompt in cfg.generation.prompts
        }
    return result
