"""LoRA / DoRA through peft: what trains, what the run directory holds, exact resume, and one-line errors."""

from __future__ import annotations

import importlib
import json
import logging
import sys
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from igea.cli import main
from igea.config import ConfigError
from igea.lora import ADAPTER_DIR, apply_lora, save_adapter
from igea.modeling import load_pretrained
from igea.report import write_report
from igea.rundir import RUN_MARKER

from conftest import build_trait_model, config_dict, make_config, train_until_first_checkpoint, write_config

train_module = importlib.import_module("igea.train")

LORA = {"r": 8, "modules_to_save": ["lm_head"]}  # alpha: 2 r by default
STEPS = {"learning_rate": 5e-3, "seed": 3}
DATA = {"validation_split": 8}  # documents: a small held-out set keeps the evaluations short


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, corpus_file, tmp_path_factory):
    cfg = make_config(tmp_path_factory.mktemp("lora"), tiny_model_dir, corpus_file, peft=LORA, training=STEPS,
                      data=DATA)
    return train_module.train(cfg)


def tokens(n: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(4, 500, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_only_the_adapters_and_modules_to_save_change(lora_run, tiny_model_dir):
    base = load_file(tiny_model_dir / "model.safetensors")
    merged = load_file(lora_run.output_dir / "model.safetensors")
    assert merged.keys() == base.keys()
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    expected = {name for name in base if name.endswith(tuple(f"{m}.weight" for m in linear))} | {"lm_head.weight"}
    assert changed == expected  # embeddings and norms are untouched; every adapted layer and the LM head moved

    adapter = load_file(lora_run.output_dir / ADAPTER_DIR / "adapter_model.safetensors")
    assert all("lora_" in name or "lm_head" in name for name in adapter)
    assert any("lora_B" in name and adapter[name].abs().sum() > 0 for name in adapter)  # B starts at zero


@pytest.mark.slow
def test_loss_decreases(lora_run):
    losses = [entry["loss"] for entry in lora_run.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    assert lora_run.metrics["after"]["eval_loss"] < lora_run.metrics["before"]["eval_loss"]


@pytest.mark.slow
def test_merged_weights_give_the_adapter_models_logits(lora_run, tiny_model_dir):
    merged, _ = load_pretrained(str(lora_run.output_dir), device="cpu")  # what igea generate / eval load
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                        str(lora_run.output_dir / ADAPTER_DIR)).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        ids = tokens()
        got, want, before = merged(ids).logits, adapted(ids).logits, base(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, before, atol=1e-2)  # the adapter did change the model


@pytest.mark.slow
def test_card_and_run_record_say_what_was_trained(lora_run, tiny_model_dir):
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                        str(lora_run.output_dir / ADAPTER_DIR), is_trainable=True)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    record = json.loads((lora_run.output_dir / RUN_MARKER).read_text())
    adapter = record["metrics"]["adapter"]
    assert (adapter["trainable_parameters"], adapter["base_parameters"]) == (trainable, base)
    assert record["config"]["peft"]["r"] == 8

    card = write_report(lora_run.output_dir).read_text()
    assert "LoRA adapters of rank 8 (alpha 16, dropout 0) on down_proj, gate_proj, k_proj" in card
    assert f"trained in full: lm_head. Trainable parameters: {trainable:,} ({trainable / base:.2%} of" in card


@pytest.mark.slow
def test_resume_after_a_checkpoint_is_bit_identical(lora_run, tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, peft=LORA, training=STEPS, data=DATA)
    train_until_first_checkpoint(cfg, monkeypatch)
    checkpoint = tmp_path / "run" / "checkpoint-10"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()

    resumed = train_module.train(cfg, resume=True)
    for name in ("model.safetensors", f"{ADAPTER_DIR}/adapter_model.safetensors"):
        want, got = load_file(lora_run.output_dir / name), load_file(resumed.output_dir / name)
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), name


@pytest.mark.slow
def test_unmerged_run_dir_loads_the_adapter_on_its_base(tiny_model_dir, corpus_file, tmp_path):
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, peft={**LORA, "merge": False},
                      training={**STEPS, "max_steps": 3, "save_strategy": "no"}, data={"validation_split": 0})
    out = train_module.train(cfg).output_dir
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    loaded, _ = load_pretrained(str(out), device="cpu")  # transformers finds the base and adds the adapter
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(tokens()).logits, adapted(tokens()).logits, atol=1e-5, rtol=0)


def test_dora_merges_to_the_same_logits(tiny_model_dir, corpus_file, tmp_path):
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, peft={"r": 4, "use_dora": True,
                                                                   "target_modules": ["q_proj", "down_proj"]})
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg).eval()
    adapted_layers = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted_layers == {"q_proj", "down_proj"}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:  # stands for training: the adapters are no longer identity
                param.add_(torch.randn_like(param) * 0.1)
        adapted = model(tokens()).logits
        merged = model.merge_and_unload()(tokens()).logits
    assert torch.allclose(adapted, merged, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("values", "message"), [
    ({"r": 0}, "peft.r: 0 is not allowed; it must be at least 1"),
    ({"alpha": -1}, "peft.alpha: -1.0 is not allowed; it must be greater than 0"),
    ({"dropout": 1}, "peft.dropout: 1.0 is not allowed; it must be in [0, 1)"),
    ({"target_modules": []}, "peft.target_modules: [] is not allowed"),
    ({"target_modules": ["all-linear", "lm_head"]}, "all-linear stands alone"),
    ({"rank": 8}, "unknown key 'peft.rank'; allowed: r, alpha, dropout, target_modules"),
    ({"use_dora": "yes"}, "peft.use_dora: expected true/false, got 'yes'"),
])
def test_bad_peft_values_are_one_config_error(tiny_model_dir, corpus_file, tmp_path, values, message):
    with pytest.raises(ConfigError) as err:
        make_config(tmp_path, tiny_model_dir, corpus_file, peft=values)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_module_is_one_line_before_anything_is_written(tiny_model_dir, corpus_file, tmp_path, capsys):
    config = write_config(tmp_path, "typo", tiny_model_dir, corpus_file)
    assert main(["train", str(config), "peft.target_modules=[q_projj]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("igea: error: peft.target_modules: no module named 'q_projj' in the model; did you mean "
                          "'q_proj'") and err.count("\n") == 1
    assert main(["train", str(config), "peft.modules_to_save=[embed_token]"]) == 2
    assert "peft.modules_to_save: no module named 'embed_token'" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


def test_missing_peft_is_one_line_naming_the_extra(tiny_model_dir, corpus_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # find_spec then reports it missing
    raw = config_dict(tmp_path / "run", tiny_model_dir, corpus_file)
    config = tmp_path / "c.json"  # YAML is a superset of JSON
    config.write_text(json.dumps({**raw, "model": {"tiny": {"vocab_size": 300}}, "peft": {}}))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == 'igea: error: the peft: section needs the peft package: pip install "igea[lora]"\n'
    assert not (tmp_path / "run").exists()  # not even the tiny base model was built


# ----------------------------------------------------------------------------------------------------------
# Tied input and output embeddings (SmolLM, Llama-3.2-1B, Qwen2.5, Gemma)

TIED_LORA = {"r": 4, "modules_to_save": ["embed_tokens", "lm_head"]}
TIED_STEPS = {**STEPS, "max_steps": 4, "save_steps": 2, "eval_steps": 4, "logging_steps": 2,
              "per_device_train_batch_size": 2}
TIED_DATA = {"block_size": 32, "validation_split": 2}


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory, corpus_file):
    return build_trait_model("tied", corpus_file.read_text(encoding="utf-8").splitlines(),
                             tmp_path_factory.mktemp("tied") / "model")


@pytest.fixture(scope="module")
def tied_lora_run(tied_model_dir, corpus_file, tmp_path_factory, one_thread):
    cfg = make_config(tmp_path_factory.mktemp("tied-lora"), tied_model_dir, corpus_file, peft=TIED_LORA,
                      training=TIED_STEPS, data=TIED_DATA)
    return train_module.train(cfg)


@pytest.mark.slow
def test_tied_embeddings_stay_tied_and_count_once(tied_lora_run, tied_model_dir):
    out = tied_lora_run.output_dir
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    base, merged = load_file(tied_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert merged.keys() == base.keys() and "lm_head.weight" not in merged  # one matrix, as in the base
    assert (out / "model.safetensors").stat().st_size == (tied_model_dir / "model.safetensors").stat().st_size
    assert not torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # it trained

    loaded, _ = load_pretrained(str(out), device="cpu")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tied_model_dir),
                                        str(out / ADAPTER_DIR), is_trainable=True)
    ids = tokens(length=16) % 390
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, adapted.eval()(ids).logits, atol=1e-5, rtol=0)

    embedding = base["model.embed_tokens.weight"].numel()
    lora = sum(p.numel() for name, p in adapted.named_parameters() if "lora_" in name)
    adapter = tied_lora_run.metrics["adapter"]
    assert adapter["trainable_parameters"] == lora + embedding  # the shared matrix once
    # adapter/ holds the matrix once, as a base weight: peft trains the adapters on it (tests below)
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == lora
    assert adapter["base_parameters"] == sum(t.numel() for t in base.values())
    card = write_report(out).read_text()
    assert f"trained in full: embed_tokens, lm_head. Trainable parameters: {lora + embedding:,} (" in card


def test_naming_one_of_a_tied_pair_trains_both_as_one_without_peft_warnings(tied_model_dir, corpus_file, tmp_path,
                                                                            caplog):
    cfg = make_config(tmp_path, tied_model_dir, corpus_file, peft={"r": 4, "modules_to_save": ["lm_head"]})
    caplog.set_level(logging.INFO, logger="igea")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = apply_lora(AutoModelForCausalLM.from_pretrained(tied_model_dir), cfg)
        with torch.no_grad():
            model.get_input_embeddings().weight.add_(1.0)  # stands for training the shared matrix
            adapted = model(tokens(length=8) % 390).logits
        merged = model.merge_and_unload()
    assert [str(w.message) for w in caught if "tie" in str(w.message).lower()] == []
    assert cfg.peft.modules_to_save == ["lm_head"]  # peft edits the list it is given: not the config's
    assert "embed_tokens and lm_head share one matrix in this model (tied embeddings)" in caplog.text
    assert merged.lm_head.weight is merged.model.embed_tokens.weight and merged.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.allclose(merged(tokens(length=8) % 390).logits, adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("named", [["embed_tokens"], ["lm_head"]])
def test_the_adapter_saves_a_tied_matrix_once_and_loads_back_tied(named, tied_model_dir, corpus_file, tmp_path):
    """peft saves the shared matrix under both names (236 MB instead of 123 for a 135M model, issue 26); adapter/
    holds it once, and `PeftModel.from_pretrained` gives back the run's model, tied, without a warning."""
    from transformers import Trainer, TrainingArguments

    cfg = make_config(tmp_path, tied_model_dir, corpus_file, peft={"r": 4, "modules_to_save": named})
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tied_model_dir), cfg)
    with torch.no_grad():  # stands for training: the shared matrix and the adapters move
        model.get_input_embeddings().weight.add_(0.5)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.01)
    ids = tokens(length=12) % 390
    with torch.no_grad():
        trained = model(ids).logits
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True,
                                                          report_to=[]))
    summary = save_adapter(trainer, cfg.peft, tmp_path / "staging")
    adapter_dir = tmp_path / "staging" / ADAPTER_DIR
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    matrix = model.get_input_embeddings().weight
    assert [k for k in saved if "lora_" not in k] == ["base_model.model.model.embed_tokens.weight"]
    lora_bytes = sum(t.numel() * t.element_size() for k, t in saved.items() if "lora_" in k)
    size = (adapter_dir / "adapter_model.safetensors").stat().st_size
    assert size < matrix.numel() * matrix.element_size() + lora_bytes + 16_384  # the matrix once, and the adapters
    assert summary["tied_embeddings"] == ["embed_tokens", "lm_head"]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tied_model_dir), str(adapter_dir))
    assert [str(w.message) for w in caught if "key" in str(w.message).lower()] == []
    assert loaded.get_input_embeddings().weight is loaded.get_output_embeddings().weight
    assert torch.equal(loaded.get_input_embeddings().weight, matrix)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "staging")
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, trained, atol=1e-5, rtol=0)
        assert torch.allclose(merged(ids).logits, trained, atol=1e-5, rtol=0)


def test_an_adapter_on_a_tied_pair_is_one_config_error(tied_model_dir, corpus_file, tmp_path, capsys):
    config = write_config(tmp_path, "tied", tied_model_dir, corpus_file)
    assert main(["train", str(config), "peft.target_modules=[q_proj, lm_head]"]) == 2
    err = capsys.readouterr().err
    assert err == ("igea: error: peft.target_modules: 'lm_head' shares its matrix with 'embed_tokens' in this model "
                   "(tied embeddings), and peft merges an adapter there twice; train the pair in full instead: "
                   "peft.modules_to_save: [embed_tokens, lm_head]\n")
    assert not (tmp_path / "tied").exists()


@pytest.mark.slow
def test_tied_resume_after_a_checkpoint_is_bit_identical(tied_lora_run, tied_model_dir, corpus_file, tmp_path,
                                                         monkeypatch, one_thread):
    cfg = make_config(tmp_path, tied_model_dir, corpus_file, peft=TIED_LORA, training=TIED_STEPS, data=TIED_DATA)
    train_until_first_checkpoint(cfg, monkeypatch)
    resumed = train_module.train(cfg, resume=True)
    for name in ("model.safetensors", f"{ADAPTER_DIR}/adapter_model.safetensors"):
        want, got = load_file(tied_lora_run.output_dir / name), load_file(resumed.output_dir / name)
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), name
