"""Real models' traits, each on a tiny model built locally (conftest.py: TRAITS, build_trait_model): train,
resume, LoRA with the embeddings trained in full, `igea eval` and `igea generate` on every one; and a checkpoint
saved without its tokenizer (`model.tokenizer`).

Each trait trains a few steps of two layers of width 32 on one thread: one trait costs a few seconds.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import igea
from igea.cli import main
from igea.config import ConfigError, load_config
from igea.lora import ADAPTER_DIR
from igea.modeling import load_pretrained

from conftest import TRAITS, build_trait_model, config_dict, real_abstracts, train_until_first_checkpoint

pytestmark = pytest.mark.slow

CASES = [(trait, "eos") for trait in TRAITS] + [("bos", "special_tokens")]
"""Each trait with EOS after every document; the tokenizer that adds BOS itself also with its own boundaries."""

DATA = {"block_size": 32, "validation_split": 1}
STEPS = {"max_steps": 4, "save_steps": 2, "eval_steps": 4, "logging_steps": 2, "learning_rate": 5e-3,
         "per_device_train_batch_size": 2, "seed": 5}
LORA = {"r": 4, "modules_to_save": ["embed_tokens", "lm_head"]}
PROMPT = "Il fegato è"


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return real_abstracts(limit=120)


@pytest.fixture(scope="module")
def files(tmp_path_factory, texts) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real-models")
    corpus, heldout = root / "corpus.txt", root / "heldout.txt"
    corpus.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n", encoding="utf-8")
    heldout.write_text("\n".join(t.replace("\n", " ") for t in real_abstracts("dev", limit=2)) + "\n",
                       encoding="utf-8")
    return {"corpus": corpus, "heldout": heldout, "root": root}


@pytest.fixture(scope="module")
def trait_model(files, texts):
    """The model directory of a trait, built on first use."""
    built: dict[str, Path] = {}

    def model(trait: str) -> Path:
        if trait not in built:
            built[trait] = build_trait_model(trait, texts, files["root"] / "models" / trait)
        return built[trait]

    return model


@dataclass
class Case:
    """One trait's model and runs: `run_dir` is an uninterrupted `igea train` of `config("run")`."""

    trait: str
    boundary: str
    model_dir: Path
    root: Path
    corpus: Path

    def config(self, name: str, **sections) -> Path:
        """A config file running into `root/name`."""
        raw = config_dict(self.root / name, self.model_dir, self.corpus,
                          data={**DATA, "document_boundary": self.boundary, "cache_dir": str(self.root / "cache")},
                          training=STEPS, **sections)
        path = self.root / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        return path

    @property
    def run_dir(self) -> Path:
        return self.root / "run"


@pytest.fixture(scope="module", params=CASES, ids=[f"{t}-{b}" for t, b in CASES])
def case(request, trait_model, files, one_thread) -> Case:
    trait, boundary = request.param
    case = Case(trait, boundary, trait_model(trait), files["root"] / f"{trait}-{boundary}", files["corpus"])
    assert main(["train", str(case.config("run"))]) == 0
    return case


def test_trains_and_resumes_to_the_weights_of_an_uninterrupted_run(case, monkeypatch):
    metrics = json.loads((case.run_dir / "metrics.json").read_text())
    assert metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"]
    base, trained = load_file(case.model_dir / "model.safetensors"), load_file(case.run_dir / "model.safetensors")
    assert trained.keys() == base.keys()  # tied embeddings stay one matrix
    saved = json.loads((case.run_dir / "config.json").read_text())
    model = json.loads((case.model_dir / "config.json").read_text())
    for key in ("tie_word_embeddings", "sliding_window", "vocab_size", "bos_token_id", "eos_token_id"):
        assert saved.get(key) == model.get(key), key

    config = case.config("resumed")
    train_until_first_checkpoint(load_config(config), monkeypatch)
    assert main(["train", str(config), "--resume"]) == 0
    resumed = load_file(case.root / "resumed" / "model.safetensors")
    assert all(torch.equal(resumed[k], trained[k]) for k in trained)


def test_blocks_hold_the_tokenizers_ids_and_boundaries(case):
    cfg = load_config(case.config("run"))
    tokenizer = AutoTokenizer.from_pretrained(case.run_dir)
    data = igea.prepare_dataset(cfg, tokenizer)  # prepared by the run: read back from the cache
    ids = torch.tensor(data.train["input_ids"])
    stats = json.loads((case.run_dir / "metrics.json").read_text())["data"]
    assert stats["prepared"]["token_dtype"] == ("int32" if len(tokenizer) > 65_536 else "uint16")
    if case.trait == "vocab70k":
        assert ids.min() >= 70_000  # every real id is above 65,535: none was wrapped
    boundary = tokenizer.eos_token_id if case.boundary == "eos" else tokenizer.bos_token_id
    documents = stats["train"]["documents"]
    assert documents - 1 <= (ids == boundary).sum() <= documents  # the last one may fall in the dropped remainder


def test_lora_with_the_embeddings_in_full_merges_to_the_adapter_models_logits(case, texts):
    assert main(["train", str(case.config("lora", peft=LORA, eval={"before_training": False}))]) == 0
    out = case.root / "lora"
    merged, tokenizer = load_pretrained(str(out), device="cpu")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(case.model_dir),
                                        str(out / ADAPTER_DIR)).eval()
    ids = tokenizer(texts[-1], return_tensors="pt")["input_ids"][:, :48]  # longer than the sliding window
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=0)
    base = load_file(case.model_dir / "model.safetensors")
    assert load_file(out / "model.safetensors").keys() == base.keys()
    tied = json.loads((case.model_dir / "config.json").read_text()).get("tie_word_embeddings")
    assert json.loads((out / "config.json").read_text()).get("tie_word_embeddings") == tied


def test_eval_and_generate_read_the_run_directory(case, files, capsys, tmp_path):
    results = tmp_path / "eval.json"
    assert main(["eval", str(case.run_dir), "--corpus", str(files["heldout"]), "--compare", str(case.model_dir),
                 "--output", str(results)]) == 0
    models = json.loads(results.read_text())["models"]
    trained, base = (entry["held_out"]["loss"] for entry in models.values())
    assert math.isfinite(trained) and trained < base
    capsys.readouterr()

    assert main(["generate", str(case.run_dir), PROMPT, "--max-new-tokens", "24", "--seed", "0"]) == 0
    text = capsys.readouterr().out
    assert text.strip() and not any(piece in text for piece in ("Ġ", "▁", "<s>", "</s>", "<0x"))  # decoded text


# ----------------------------------------------------------------------------------------------------------
# A checkpoint saved without its tokenizer (`model.tokenizer`)


@pytest.fixture(scope="module")
def bare_checkpoint(trait_model, files) -> tuple[Path, Path]:
    """A Llama-2-style model directory with weights and config only, as another trainer saves it, and the
    directory of its tokenizer."""
    full = trait_model("bos")
    bare = files["root"] / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(full / name, bare / name)
    return bare, full


def bare_config(files, bare: Path, name: str, **model) -> Path:
    raw = config_dict(files["root"] / name, bare, files["corpus"], data={**DATA, "validation_split": 0},
                      training={**STEPS, "max_steps": 2, "save_strategy": "no"})
    raw["model"].update(model)
    path = files["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_a_checkpoint_without_tokenizer_is_one_line_naming_model_tokenizer(bare_checkpoint, files, capsys):
    bare, _ = bare_checkpoint
    assert main(["train", str(bare_config(files, bare, "no-tokenizer"))]) == 2
    err = capsys.readouterr().err
    assert err == (f"igea: error: model.name_or_path: directory '{bare}' has no tokenizer (none of tokenizer.json, "
                   "tokenizer_config.json, tokenizer.model, vocab.json, vocab.txt, spiece.model); set "
                   "model.tokenizer to the hub id or directory of its tokenizer\n")
    assert not (files["root"] / "no-tokenizer").exists()

    for command in (["eval", str(bare), "--corpus", str(files["heldout"])], ["generate", str(bare), PROMPT]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err == (f"igea: error: cannot load model: directory '{bare}' has no tokenizer (none of "
                       "tokenizer.json, tokenizer_config.json, tokenizer.model, vocab.json, vocab.txt, spiece.model); "
                       "copy the tokenizer files of the model it was trained from into it\n")


def test_a_tokenizer_config_without_tokenizer_json_is_one_line(bare_checkpoint, files, capsys):
    bare, _ = bare_checkpoint
    partial = files["root"] / "partial"
    shutil.copytree(bare, partial)
    (partial / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    assert main(["generate", str(partial), PROMPT]) == 2
    assert capsys.readouterr().err == (
        f"igea: error: cannot load the tokenizer of '{partial}': it has no tokenizer.json, nor a slow tokenizer's "
        "files to convert (with sentencepiece or tiktoken installed)\n")


def test_model_tokenizer_trains_a_bare_checkpoint_and_the_run_directory_keeps_it(bare_checkpoint, files, one_thread):
    bare, tokenizer_dir = bare_checkpoint
    config = bare_config(files, bare, "with-tokenizer", tokenizer=str(tokenizer_dir))
    model, tokenizer = igea.load_model(load_config(config))
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tokenizer_dir).get_vocab()
    assert tokenizer(PROMPT)["input_ids"][0] == tokenizer.bos_token_id  # its post-processor came along
    assert main(["train", str(config)]) == 0
    run_dir = files["root"] / "with-tokenizer"
    loaded, saved = load_pretrained(str(run_dir), device="cpu")  # as igea eval / generate load it
    assert saved.get_vocab() == tokenizer.get_vocab() and saved(PROMPT)["input_ids"] == tokenizer(PROMPT)["input_ids"]


@pytest.mark.parametrize(("model", "message"), [
    ({"tokenizer": "/no/such/dir"}, "model.tokenizer: directory '/no/such/dir' does not exist"),
    ({"tokenizer": "BARE"}, "model.tokenizer: directory 'BARE' has no tokenizer (none of tokenizer.json"),
    ({"tokenizer": "FULL", "name_or_path": None, "tiny": {}},
     "model.tokenizer: not with model.tiny, which trains its own tokenizer on the corpus"),
])
def test_bad_model_tokenizer_is_one_config_error(bare_checkpoint, files, model, message):
    bare, full = bare_checkpoint
    names = {"BARE": str(bare), "FULL": str(full)}
    model = {k: names.get(v, v) if isinstance(v, str) else v for k, v in model.items()}
    raw = yaml.safe_load(bare_config(files, bare, "bad").read_text())
    raw["model"].update(model)
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    assert message.replace("BARE", str(bare)) in str(err.value) and "\n" not in str(err.value)


def test_a_tokenizer_larger_than_the_embeddings_is_one_config_error(bare_checkpoint, trait_model, files):
    bare, _ = bare_checkpoint
    larger = trait_model("vocab70k")
    tokens = len(AutoTokenizer.from_pretrained(larger))
    rows = json.loads((bare / "config.json").read_text())["vocab_size"]
    with pytest.raises(ConfigError) as err:
        igea.load_model(load_config(bare_config(files, bare, "larger", tokenizer=str(larger))))
    assert str(err.value) == (f"model.tokenizer: '{larger}' has {tokens:,} tokens, more than the {rows:,} embeddings "
                              f"of '{bare}'; is it the tokenizer the model was trained with?")
