"""Shared fixtures: a tiny Mistral + BPE tokenizer built locally, and small corpora on disk."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import yaml

import igea
from igea.config import TinyModelConfig, config_from_dict

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ncbi-disease-it"

ITALIAN_DOCS = [
    "Il fegato è una ghiandola essenziale per il metabolismo dei farmaci.",
    "La fibrosi cistica è causata da mutazioni del gene CFTR.",
    "Abbiamo arruolato 120 pazienti con diabete di tipo 2 in uno studio randomizzato.",
    "La terapia con statine ha ridotto il colesterolo LDL del 35% (p < 0,001).",
    "I batteri della famiglia Bacteroides sono abbondanti nel microbioma intestinale.",
    "Nei topi transgenici la proteina mutata causa una degenerazione dei neuroni motori.",
    "L'emoglobina glicata è scesa da 8,1% a 7,2% dopo sei mesi di trattamento.",
    "La risonanza magnetica ha mostrato lesioni della sostanza bianca in 14 pazienti su 20.",
]


def real_abstracts(split: str = "train", limit: int | None = None) -> list[str]:
    """Italian PubMed translations from ../shared (real accents, long lines, units)."""
    path = SHARED_DATA / f"{split}.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return texts[:limit] if limit else texts


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A .txt corpus, one abstract a line, from the shared real translations."""
    path = tmp_path_factory.mktemp("corpus") / "abstracts.txt"
    path.write_text("\n".join(t.replace("\n", " ") for t in real_abstracts()) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, corpus_file) -> Path:
    """A tiny Mistral (2 layers, hidden 64) with a 512-token BPE tokenizer, saved as a normal HF model dir."""
    out = tmp_path_factory.mktemp("tiny") / "model"
    texts = corpus_file.read_text(encoding="utf-8").splitlines()
    shape = TinyModelConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512)
    return igea.build_tiny_model(texts, shape, out)


def config_dict(output_dir: Path, model_dir: Path, corpus: Path, **sections) -> dict:
    """A small, fast run as a plain config dict: block 64, a few steps on CPU. Keyword args update sections."""
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(corpus), "block_size": 64, "validation_split": 0.1},
        "training": {
            "output_dir": str(output_dir), "learning_rate": 1e-3, "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 8, "gradient_accumulation_steps": 1, "max_steps": 20,
            "eval_steps": 10, "logging_steps": 5, "save_steps": 10, "use_cpu": True, "disable_tqdm": True,
        },
        "generation": {"prompts": [], "max_new_tokens": 8},
        "eval": {},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def make_config(tmp_path: Path, model_dir: Path, corpus: Path, **sections) -> igea.IgeaConfig:
    """`config_dict` validated into an IgeaConfig, running into `tmp_path / "run"`."""
    return config_from_dict(config_dict(tmp_path / "run", model_dir, corpus, **sections))


def write_config(tmp_path: Path, name: str, model_dir: Path, corpus: Path, data: dict | None = None,
                 **training) -> Path:
    """`config_dict` as a YAML file `tmp_path/NAME.yaml` running into `tmp_path/NAME` (for the CLI)."""
    path = tmp_path / f"{name}.yaml"
    raw = config_dict(tmp_path / name, model_dir, corpus, training=training, data=data or {})
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


class Interrupted(Exception):
    """Stands for a crash right after a checkpoint was written."""


def train_until_first_checkpoint(cfg: igea.IgeaConfig, monkeypatch) -> None:
    """Run `igea.train(cfg)` until its first checkpoint is complete, then stop it as a crash would."""
    trainer_class = importlib.import_module("igea.train").IgeaTrainer
    original = trainer_class._save_checkpoint

    def save_then_die(self, model, trial):
        original(self, model, trial)
        raise Interrupted

    monkeypatch.setattr(trainer_class, "_save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        igea.train(cfg)
    monkeypatch.setattr(trainer_class, "_save_checkpoint", original)


RAW_WARNING = re.compile(r"\b[A-Z]\w*Warning: |^\s*warnings\.warn\(|\] Warning: ")


def raw_warning_lines(output: str) -> list[str]:
    """Lines of a command's output printed as Python (`path.py:12: UserWarning: ...`) or torch's C++ warnings
    print them, rather than as log lines."""
    return [line for line in output.splitlines() if RAW_WARNING.search(line)]
