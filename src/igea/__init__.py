"""igea: continued (domain-adaptive) pretraining of small causal language models, from one YAML config."""

__version__ = "0.1.0"

from igea.config import IgeaConfig, load_config
from igea.data import PreparedData, prepare_dataset
from igea.errors import ConfigError, IgeaError
from igea.evaluate import evaluate
from igea.generate import Completion, Generator, generate
from igea.modeling import build_tiny_model, load_model
from igea.run import run
from igea.train import RunResult, train
from igea.vocab import bits_per_byte, extend_vocabulary, fertility

__all__ = [
    "Completion",
    "ConfigError",
    "Generator",
    "IgeaConfig",
    "IgeaError",
    "PreparedData",
    "RunResult",
    "__version__",
    "bits_per_byte",
    "build_tiny_model",
    "evaluate",
    "extend_vocabulary",
    "fertility",
    "generate",
    "load_config",
    "load_model",
    "prepare_dataset",
    "run",
    "train",
]
