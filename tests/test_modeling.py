"""The base model: the tiny Mistral builder and `load_model` as the `model:` section says."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import igea
from igea.config import config_from_dict, sample_corpus_path


def tiny_config(tmp_path, **model):
    return config_from_dict({
        "model": {"tiny": {"vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "num_key_value_heads": 1, "intermediate_size": 64, "max_position_embeddings": 128},
                  **model},
        "data": {"path": sample_corpus_path(), "block_size": 64},
        "training": {"output_dir": str(tmp_path / "run"), "use_cpu": True},
    })


def test_tiny_model_is_a_normal_hf_model_dir(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert (tiny_model_dir / "model.safetensors").is_file()
    assert model.config.model_type == "mistral" and model.config.sliding_window is None
    assert model.config.vocab_size == len(tokenizer) and model.config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
    text = "Il fegato è una ghiandola."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: lossless


def test_load_model_builds_the_tiny_model_once_and_follows_the_model_section(tmp_path):
    cfg = tiny_config(tmp_path, dtype="bfloat16", gradient_checkpointing=True)
    model, tokenizer = igea.load_model(cfg)
    base = tmp_path / "run" / "base-model"
    assert (base / "config.json").is_file() and tokenizer.eos_token_id is not None
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.is_gradient_checkpointing
    stamp = (base / "model.safetensors").stat().st_mtime_ns
    again, _ = igea.load_model(tiny_config(tmp_path))  # already built: reused, not rebuilt
    assert (base / "model.safetensors").stat().st_mtime_ns == stamp
    assert next(again.parameters()).dtype == torch.float32
    assert torch.equal(again.model.embed_tokens.weight.bfloat16(), model.model.embed_tokens.weight)  # same weights
