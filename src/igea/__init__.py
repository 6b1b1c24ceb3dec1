"""igea: continued (domain-adaptive) pretraining of small causal language models, from one YAML config."""

__version__ = "0.1.0"

from transformers import PreTrainedTokenizerBase

from igea import data
from igea.config import IgeaConfig, load_config
from igea.data import PreparedData
from igea.errors import ConfigError, IgeaError
from igea.evaluate import evaluate
from igea.generate import Completion, Generator, generate
from igea.modeling import build_tiny_model, load_model, load_tokenizer
from igea.run import run
from igea.train import RunResult, train

__all__ = [
    "Completion",
    "ConfigError",
    "Generator",
    "IgeaConfig",
    "IgeaError",
    "PreparedData",
    "RunResult",
    "__version__",
    "build_tiny_model",
    "evaluate",
    "generate",
    "load_config",
    "load_model",
    "prepare_dataset",
    "run",
    "train",
]


def prepare_dataset(cfg: IgeaConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> PreparedData:
    """The packed train/validation blocks of the config's corpus (prepared once on disk, then reused).

    Tokenizes with `tokenizer`, by default the base model's (building the tiny model first if the config asks).
    """
    return data.prepare_dataset(cfg, tokenizer if tokenizer is not None else load_tokenizer(cfg))
