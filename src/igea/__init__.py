"""igea: continued (domain-adaptive) pretraining of small causal language models, from one YAML config.

`import igea` is fast: each public name is imported from its module on first use, so torch and the Trainer
stack load only when a function that needs them is called.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Completion": "igea.generate",
    "ConfigError": "igea.errors",
    "Generator": "igea.generate",
    "IgeaConfig": "igea.config",
    "IgeaError": "igea.errors",
    "PreparedData": "igea.data",
    "RunResult": "igea.train",
    "bits_per_byte": "igea.vocab",
    "build_tiny_model": "igea.modeling",
    "evaluate": "igea.evaluate",
    "extend_vocabulary": "igea.vocab",
    "fertility": "igea.vocab",
    "generate": "igea.generate",
    "load_config": "igea.config",
    "load_model": "igea.basemodel",
    "merge": "igea.merge",
    "preset": "igea.config",
    "run": "igea.run",
    "train": "igea.train",
}

__all__ = [
    "Completion", "ConfigError", "Generator", "IgeaConfig", "IgeaError", "PreparedData", "RunResult", "__version__",
    "bits_per_byte", "build_tiny_model", "evaluate", "extend_vocabulary", "fertility", "generate", "load_config",
    "load_model", "merge", "prepare_dataset", "preset", "run", "train",
]

if TYPE_CHECKING:  # what editors and type checkers see
    from transformers import PreTrainedTokenizerBase

    from igea.basemodel import load_model
    from igea.config import IgeaConfig, load_config, preset
    from igea.data import PreparedData
    from igea.errors import ConfigError, IgeaError
    from igea.evaluate import evaluate
    from igea.generate import Completion, Generator, generate
    from igea.merge import merge
    from igea.modeling import build_tiny_model
    from igea.run import run
    from igea.train import RunResult, train
    from igea.vocab import bits_per_byte, extend_vocabulary, fertility


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'igea' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """`igea.train`, `igea.run`, `igea.evaluate` and `igea.generate` are functions named like their modules:
    when Python binds a just-imported submodule to the package, the function of that name is bound instead."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def prepare_dataset(cfg: IgeaConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> PreparedData:
    """The packed train/validation blocks of the config's corpus (prepared once on disk, then reused).

    Tokenizes with `tokenizer`, by default the base model's (building the tiny model first if the config asks).
    """
    from igea.basemodel import load_tokenizer
    from igea.data import prepare_dataset as prepare
    from igea.progress import progress_bars_off_in_logs

    with progress_bars_off_in_logs():  # in a log file, no bar redrawn line after line (as the CLI has it)
        return prepare(cfg, tokenizer if tokenizer is not None else load_tokenizer(cfg))
