"""Shared fixtures: a tiny Mistral + BPE tokenizer built locally, small corpora on disk, and tiny models with real
models' traits (build_trait_model)."""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

if "PYTEST_XDIST_WORKER" in os.environ:  # `make test` runs two workers: each keeps its own datasets cache
    os.environ["HF_DATASETS_CACHE"] = str(Path(tempfile.gettempdir()) / "igea-tests" / (
        f"{os.environ.get('PYTEST_XDIST_TESTRUNUID', 'run')}-{os.environ['PYTEST_XDIST_WORKER']}"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and one torch thread: two workers' thread pools would thrash

import igea  # noqa: E402 (after the cache is chosen: datasets reads it once)
from igea.config import TinyModelConfig, config_from_dict  # noqa: E402

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


def pytest_sessionfinish(session) -> None:
    """A worker's own datasets cache goes with it."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        shutil.rmtree(os.environ["HF_DATASETS_CACHE"], ignore_errors=True)


SEVERAL_PROCESSES = ("test_distributed.py::", "test_streaming.py::test_two_ranks",
                     "test_benchmarks.py::test_prepare_ranks")
"""Tests that launch several processes: their ranks meet on one port, so they run one at a time."""


@pytest.fixture(autouse=True)
def one_launch_at_a_time(request, tmp_path_factory):
    """Under `make test`'s two workers (pytest-xdist, one file per worker at a time), a test of
    SEVERAL_PROCESSES waits for the other worker's to finish (a lock file shared by the workers)."""
    if not any(key in request.node.nodeid for key in SEVERAL_PROCESSES):
        yield
        return
    with open(tmp_path_factory.getbasetemp().parent / "igea-several-processes.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


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


def stop_after_each_checkpoint(monkeypatch, error: type[BaseException]) -> Callable[[], None]:
    """Make training raise `error` as soon as a checkpoint is complete (a crash, or Ctrl-C); returns what puts
    checkpointing back as it was."""
    trainer_class = importlib.import_module("igea.trainer").IgeaTrainer
    original = trainer_class._save_checkpoint

    def save_then_stop(self, model, trial):
        original(self, model, trial)
        raise error

    monkeypatch.setattr(trainer_class, "_save_checkpoint", save_then_stop)
    return lambda: monkeypatch.setattr(trainer_class, "_save_checkpoint", original)


def train_until_first_checkpoint(cfg: igea.IgeaConfig, monkeypatch) -> None:
    """Run `igea.train(cfg)` until its first checkpoint is complete, then stop it as a crash would."""
    restore = stop_after_each_checkpoint(monkeypatch, Interrupted)
    with pytest.raises(Interrupted):
        igea.train(cfg)
    restore()


# ----------------------------------------------------------------------------------------------------------
# Real models' traits, each on a tiny model built locally (tests/test_real_models.py)

@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the module: a model this small trains several times faster than on two threads
    that other processes compete for (results are equal within the module, which is all its tests compare)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TRAIT_SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 256}
"""Two layers, hidden 32: each trait's model trains a step in milliseconds."""

CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}</s>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def sentencepiece_tokenizer(texts: list[str], vocab_size: int):
    """A Llama-2/Mistral-style tokenizer: SentencePiece-like BPE (`▁` marks a word's start, bytes fall back to
    <0xNN>), <unk> <s> </s> at ids 0-2, no pad token, and a post-processor that adds <s> to every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        show_progress=False))
    spec = json.loads(core.to_str())["model"]
    return LlamaTokenizer(vocab=spec["vocab"], merges=[tuple(m) for m in spec["merges"]], add_bos_token=True)


def spread_vocabulary(tokenizer, size: int):
    """`tokenizer` with unused tokens at ids 0 .. size-1 and its own tokens after them: a vocabulary over `size`
    whose every real token id is above it (as Llama-3's 128k ids are above 65,535)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    spec["model"]["vocab"] = {**{f"<unused{i}>": i for i in range(size)}, **{t: i + size for t, i in vocab.items()}}
    for added in spec["added_tokens"]:
        added["id"] += size
    special = {key: getattr(tokenizer, key) for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    spread = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), **special)
    spread.model_max_length = tokenizer.model_max_length
    return spread


def save_tiny_llm(out: Path, tokenizer, model_type: str = "llama", **config) -> Path:
    """A randomly initialised tiny Llama or Mistral (TRAIT_SHAPE, then `config`) with `tokenizer`, saved as a
    plain model directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {**TRAIT_SHAPE, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **config}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


TRAITS = ("tied", "bytelevel", "bos", "vocab70k", "sliding_window")
"""tied: input and output embeddings share one matrix, byte-level BPE and a chat template (SmolLM, Llama-3.2-1B,
Qwen2.5, Gemma); bytelevel: igea's own tiny Mistral (byte-level BPE, `Ġ`, untied); bos: a SentencePiece-style
`▁` tokenizer that adds <s> itself (Llama-2, Mistral); vocab70k: 70,000+ tokens, every real id above 65,535
(Llama-3's 128k); sliding_window: a Mistral attending to the last 16 positions only."""


def build_trait_model(trait: str, texts: list[str], out: Path) -> Path:
    """The tiny model of one of TRAITS, its tokenizer trained on `texts`, saved in `out`."""
    if trait == "bytelevel":
        return igea.build_tiny_model(texts, TinyModelConfig(vocab_size=400, **TRAIT_SHAPE), out)
    if trait == "bos":
        return save_tiny_llm(out, sentencepiece_tokenizer(texts, 600))
    from igea.modeling import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(texts, 400)
    if trait == "tied":
        tokenizer.chat_template = CHAT_TEMPLATE
        return save_tiny_llm(out, tokenizer, tie_word_embeddings=True)
    if trait == "vocab70k":
        return save_tiny_llm(out, spread_vocabulary(tokenizer, 70_000))
    if trait == "sliding_window":
        return save_tiny_llm(out, tokenizer, "mistral", sliding_window=16)
    raise ValueError(trait)


RAW_WARNING = re.compile(r"\b[A-Z]\w*Warning: |^\s*warnings\.warn\(|\] Warning: ")


def raw_warning_lines(output: str) -> list[str]:
    """Lines of a command's output printed as Python (`path.py:12: UserWarning: ...`) or torch's C++ warnings
    print them, rather than as log lines."""
    return [line for line in output.splitlines() if RAW_WARNING.search(line)]
