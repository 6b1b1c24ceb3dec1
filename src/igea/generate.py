"""Text generation from a run directory or any Hugging Face causal LM: batched, seeded, streamable.

`Generator` loads a model once and decodes many prompts in left-padded batches with `model.generate`;
its parameters come from the run's `generation:` section and can be overridden per call.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    set_seed,
)

from igea.config import GenerationConfig, build_section, check_generation_values
from igea.errors import ConfigError, IgeaError
from igea.modeling import load_pretrained
from igea.progress import Progress, bars_off_in_logs
from igea.rundir import run_config

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
PARAMETERS = tuple(f.name for f in dataclasses.fields(GenerationConfig) if f.name != "prompts")


@dataclass
class Completion:
    """One continuation, with the number of tokens generated and the wall time of the batch that made it."""

    prompt: str
    text: str
    tokens: int
    seconds: float


class Generator:
    """A causal LM and its tokenizer, loaded once, continuing one prompt or many."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: GenerationConfig | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or GenerationConfig()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.truncation_side = "left"  # used only when a call asks for truncate_left

    @classmethod
    @bars_off_in_logs
    def from_pretrained(
        cls,
        path: str,
        device: str | None = None,
        dtype: str | None = None,
        config: GenerationConfig | None = None,
        trust_remote_code: bool = False,
    ) -> Generator:
        """Load a run directory, a model directory or a hub id.

        `device` defaults to CUDA when available, `dtype` to the checkpoint's own; `config` defaults to the
        `generation:` section a run directory was trained with, else to `GenerationConfig()`.
        """
        model, tokenizer = load_pretrained(path, device, dtype, trust_remote_code)
        return cls(model, tokenizer, config or run_generation_config(path))

    @property
    def context_length(self) -> int | None:
        """Positions the model was built for (prompt + new tokens must fit); None if its config is silent."""
        return getattr(self.model.config, "max_position_embeddings", None)

    def settings(self, **overrides: Any) -> GenerationConfig:
        """The configured generation parameters with per-call overrides applied and checked."""
        settings = with_overrides(self.config, **overrides)
        if self.context_length is not None and settings.max_new_tokens >= self.context_length:
            raise ConfigError(
                f"max_new_tokens: {settings.max_new_tokens} is not allowed; it must be less than the model's "
                f"context of {self.context_length} positions"
            )
        return settings

    def generate(
        self,
        prompts: str | list[str],
        full_text: bool = False,
        truncate_left: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        **overrides: Any,
    ) -> list[str]:
        """Continuations of each prompt (`num_return_sequences` per prompt, in order); prompt + continuation
        with `full_text`. `truncate_left` drops the oldest tokens of prompts too long for the context.

        Greedy texts do not depend on the batching; sampled texts are reproduced by the same seed, prompts
        and `batch_size` (the batch shares one random stream).
        """
        completions = self.complete(prompts, truncate_left=truncate_left, batch_size=batch_size, **overrides)
        return [c.prompt + c.text if full_text else c.text for c in completions]

    def complete(
        self,
        prompts: str | list[str],
        truncate_left: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        **overrides: Any,
    ) -> list[Completion]:
        """`generate` with token counts and timings: decodes left-padded batches of `batch_size` prompts."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if batch_size < 1:
            raise ConfigError(f"batch_size: {batch_size!r} is not allowed; it must be at least 1")
        s = self.settings(**overrides)
        ids = self._encode(prompts, s, truncate_left)
        if s.seed is not None:
            set_seed(s.seed)
        completions: list[Completion] = []
        batches = math.ceil(len(ids) / batch_size)
        if batches > 1:  # long work says what it does: a bar in a terminal, lines with an ETA in a log file
            logger.info("generating for %d prompts in %d batches of %d", len(ids), batches, batch_size)
        with Progress("generating", len(ids), "prompts", logger=logger, bar=batches > 1,
                      say_done=batches > 1) as progress:
            for start in range(0, len(ids), batch_size):
                end = start + batch_size
                completions += self._complete_batch(prompts[start:end], ids[start:end], s)
                progress.update(len(completions) - progress.done)
        return completions

    def stream(self, prompt: str, truncate_left: bool = False, **overrides: Any) -> Iterator[str]:
        """Pieces of the continuation of one prompt, yielded as they are produced; they join into the text
        `generate` returns. Closing the iterator early stops the generation."""
        s = self.settings(**overrides)
        check_streamable(s)
        return self._stream(self._pad(self._encode([prompt], s, truncate_left)), s)

    def _stream(self, inputs: dict[str, torch.Tensor], s: GenerationConfig) -> Iterator[str]:
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = _Cancel()
        criteria = StoppingCriteriaList([stop])
        failures: list[BaseException] = []

        def work() -> None:
            try:
                self._model_generate(inputs, s, streamer=streamer, stopping_criteria=criteria)
            except BaseException as err:  # re-raised in the consuming thread below
                failures.append(err)
                streamer.end()

        if s.seed is not None:
            set_seed(s.seed)
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            yield from streamer
        finally:
            stop.event.set()
            worker.join()
        if failures:
            raise failures[0]

    def _encode(self, prompts: list[str], s: GenerationConfig, truncate_left: bool) -> list[list[int]]:
        """Token ids of each prompt, checked to be non-empty and to leave room for `max_new_tokens`."""
        if not prompts:
            raise IgeaError("generate: no prompts given")
        for i, prompt in enumerate(prompts, 1):
            if not isinstance(prompt, str):
                raise IgeaError(f"prompt {i} is a {type(prompt).__name__}, not a string")
        room = None if self.context_length is None else self.context_length - s.max_new_tokens
        truncation = {"truncation": True, "max_length": room} if truncate_left and room is not None else {}
        ids = self.tokenizer(prompts, **truncation)["input_ids"]
        for i, row in enumerate(ids, 1):
            if not row:
                raise IgeaError(f"prompt {i} is empty: it encodes to no tokens")
            if room is not None and len(row) > room:
                raise IgeaError(
                    f"prompt {i} is {len(row)} tokens: with max_new_tokens {s.max_new_tokens} it does not "
                    f"fit the model's context of {self.context_length} positions; shorten it or truncate it "
                    "from the left (truncate_left=True, --truncate-left)"
                )
        return ids

    def _pad(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        padded = self.tokenizer.pad({"input_ids": ids}, padding_side="left", return_tensors="pt")
        return padded.to(self.model.device)

    def _complete_batch(
        self, prompts: list[str], ids: list[list[int]], s: GenerationConfig
    ) -> list[Completion]:
        inputs = self._pad(ids)
        started = time.perf_counter()
        new_tokens = self._model_generate(inputs, s)[:, inputs["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        seconds = time.perf_counter() - started
        lengths = generated_lengths(new_tokens, self._eos_ids())
        repeated = [p for p in prompts for _ in range(s.num_return_sequences)]
        return [Completion(p, t, n, seconds) for p, t, n in zip(repeated, texts, lengths, strict=True)]

    def _model_generate(
        self, inputs: dict[str, torch.Tensor], s: GenerationConfig, **extra: Any
    ) -> torch.Tensor:
        sampling = {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k}
        if not s.do_sample:  # unset: a checkpoint's own sampling defaults must not apply to greedy decoding
            sampling = dict.fromkeys(sampling)
        with torch.inference_mode():
            return self.model.generate(
                **inputs,
                max_new_tokens=s.max_new_tokens,
                do_sample=s.do_sample,
                repetition_penalty=s.repetition_penalty,
                num_return_sequences=s.num_return_sequences,
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling,
                **extra,
            )

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


class _Cancel(StoppingCriteria):
    """Stops a generation running in another thread once its `event` is set."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        stop = self.event.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def with_overrides(config: GenerationConfig, **overrides: Any) -> GenerationConfig:
    """`config` with some parameters replaced, each checked for type and range."""
    settings = build_section(GenerationConfig, {**dataclasses.asdict(config), **overrides}, "")
    check_generation_values(settings)
    return settings


def check_streamable(s: GenerationConfig) -> None:
    """A stream carries one sequence."""
    if s.num_return_sequences != 1:
        n = s.num_return_sequences
        raise ConfigError(f"num_return_sequences: {n} is not allowed when streaming; it must be 1")


def generated_lengths(new_tokens: torch.Tensor, eos_ids: list[int]) -> list[int]:
    """Tokens each row generated, up to and including its first EOS (what follows it is padding)."""
    eos = torch.tensor(eos_ids, dtype=new_tokens.dtype, device=new_tokens.device)
    is_eos = torch.isin(new_tokens, eos)
    first = is_eos.int().argmax(dim=1) + 1
    return torch.where(is_eos.any(dim=1), first, new_tokens.shape[1]).tolist()


def run_generation_config(path: str) -> GenerationConfig | None:
    """The `generation:` section a run directory was trained with; None for other model directories."""
    config = run_config(path)
    if config is None:
        return None
    return build_section(GenerationConfig, config.get("generation", {}), "generation.")


def generate(
    path: str, prompts: str | list[str], device: str | None = None, dtype: str | None = None, **kwargs: Any
) -> list[str]:
    """Load `path` once and return the continuations of `prompts` (see `Generator.generate`)."""
    return Generator.from_pretrained(path, device=device, dtype=dtype).generate(prompts, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# igea generate
