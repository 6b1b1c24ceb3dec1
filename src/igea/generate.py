"""Text generation from a run directory or any Hugging Face causal LM: batched, seeded, streamable."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, set_seed

from igea.config import GenerationConfig, ModelConfig, _coerce, check_generation_values
from igea.errors import ConfigError, IgeaError
from igea.modeling import DTYPES, _from_pretrained


class Generator:
    """A model and tokenizer loaded once, generating continuations for one prompt or many."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: GenerationConfig | None = None
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or GenerationConfig()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        device: str | None = None,
        dtype: str | None = None,
        config: GenerationConfig | None = None,
        trust_remote_code: bool = False,
    ) -> Generator:
        """Load a run directory, a model directory or a hub id; `device` defaults to CUDA when available."""
        model_cfg = ModelConfig(name_or_path=path, dtype=dtype or "auto", trust_remote_code=trust_remote_code)
        if model_cfg.dtype not in ("auto", *DTYPES):
            raise ConfigError(f"dtype: {dtype!r} is not allowed; choose one of auto, {', '.join(DTYPES)}")
        tokenizer = _from_pretrained(AutoTokenizer, path, model_cfg)
        model = _from_pretrained(AutoModelForCausalLM, path, model_cfg, dtype=DTYPES.get(model_cfg.dtype, "auto"))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device), tokenizer, config)

    def settings(self, **overrides: Any) -> GenerationConfig:
        """The configured generation parameters with per-call overrides applied and checked."""
        names = {f.name for f in dataclasses.fields(GenerationConfig)} - {"prompts"}
        hints = {f.name: f.type for f in dataclasses.fields(GenerationConfig)}
        unknown = set(overrides) - names
        if unknown:
            raise ConfigError(f"unknown generation parameter {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(names))}")
        import typing

        types = typing.get_type_hints(GenerationConfig)
        checked = {k: _coerce(v, types[k], k) for k, v in overrides.items() if v is not None or "None" in hints[k]}
        settings = dataclasses.replace(self.config, **checked)
        check_generation_values(settings)
        return settings

    def generate(self, prompts: str | list[str], full_text: bool = False, **overrides: Any) -> list[str]:
        """Continuations of each prompt (`num_return_sequences` per prompt, in order), batched with left padding."""
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        if not batch:
            raise IgeaError("generate: no prompts given")
        s = self.settings(**overrides)
        if s.seed is not None:
            set_seed(s.seed)
        inputs = self._encode(batch)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **self._generate_kwargs(s))
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        if full_text:
            repeated = [p for p in batch for _ in range(s.num_return_sequences)]
            texts = [p + t for p, t in zip(repeated, texts)]
        return texts

    def stream(self, prompt: str, **overrides: Any) -> Iterator[str]:
        """Yield pieces of the continuation of one prompt as they are produced."""
        from threading import Thread

        from transformers import TextIteratorStreamer

        s = self.settings(**overrides)
        if s.num_return_sequences != 1:
            raise ConfigError("stream: num_return_sequences must be 1 when streaming")
        if s.seed is not None:
            set_seed(s.seed)
        inputs = self._encode([prompt])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {**inputs, **self._generate_kwargs(s), "streamer": streamer}
        worker = Thread(target=self._generate_in_thread, kwargs=kwargs, daemon=True)
        worker.start()
        yield from streamer
        worker.join()

    def _generate_in_thread(self, **kwargs: Any) -> None:
        with torch.inference_mode():
            self.model.generate(**kwargs)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if any(not p for p in prompts):
            raise IgeaError("generate: a prompt is empty")
        return self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.model.device)

    def _generate_kwargs(self, s: GenerationConfig) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": s.max_new_tokens,
            "do_sample": s.do_sample,
            "repetition_penalty": s.repetition_penalty,
            "num_return_sequences": s.num_return_sequences,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if s.do_sample:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        return kwargs


def generate(path: str, prompts: str | list[str], **kwargs: Any) -> list[str]:
    """Load `path` once and return the continuations of `prompts` (see `Generator.generate`)."""
    return Generator.from_pretrained(path).generate(prompts, **kwargs)
