"""Scoring multiple-choice tasks by log-likelihood, as lm-evaluation-harness scores them.

A choice is scored by the summed log-probability of `target_delimiter + choice` after its prompt; `acc` takes
the best-scored choice, `acc_norm` the best score divided by the choice's length in characters. Prompts are
tokenized as lm-eval's HFLM tokenizes them, so the numbers are those lm-eval reports.

Scoring runs the model once over each prompt and then over all of its choices at once, reusing the prompt's
key/value cache, instead of once per (prompt, choice) pair.
"""

from __future__ import annotations

import inspect
import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from igea.config import EvalConfig
from igea.errors import IgeaError
from igea.progress import Progress, duration
from igea.tasks.base import MultipleChoiceTask
from igea.tasks.load import load_task

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's context length when neither the model nor the tokenizer names one



@dataclass
class Encoded:
    """Token ids of one prompt and of each of its continuations, split as lm-eval splits them."""

    context: list[int]
    continuations: list[list[int]]


def context_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest input the model takes, looked up as lm-eval does (config, then tokenizer, then 2048)."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, attr, None)
        if value:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 1e9 else DEFAULT_MAX_LENGTH


def encode_request(
    tokenizer: PreTrainedTokenizerBase, context: str, continuations: list[str], max_length: int
) -> Encoded:
    """Token ids of a prompt and its continuations, as lm-eval's HFLM makes them.

    Trailing spaces of the prompt move to the continuations; each continuation's ids are those of
    `prompt + continuation` after the prompt's own ids (so merges across the boundary count for the choice).
    The tokenizer adds its special tokens (BOS) unless the prompt already starts with one. A prompt longer
    than the model's context loses its first tokens.
    """
    stripped = context.rstrip()
    spaces = context[len(stripped):]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    add_special = not stripped.startswith(tokenizer.decode(prefix))
    texts = [stripped] + [stripped + spaces + c for c in continuations]
    context_ids, *wholes = tokenizer(texts, add_special_tokens=add_special)["input_ids"]
    conts = [whole[len(context_ids):] for whole in wholes]
    for text, cont in zip(continuations, conts, strict=True):
        if not cont:
            raise IgeaError(f"choice {text!r} adds no token to its prompt")
    keep = max_length + 1 - max(len(c) for c in conts)
    if keep < 1:
        raise IgeaError(f"a choice is longer than the model's context ({max_length} tokens)")
    if len(context_ids) > keep:
        logger.warning("prompt of %d tokens cut to its last %d to fit the model", len(context_ids), keep)
        context_ids = context_ids[-keep:]
    if not context_ids:
        raise IgeaError("a prompt is empty after tokenization")
    return Encoded(context_ids, conts)


def _pad(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (pad id 0, never attended) and the mask of real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])
    return ids.to(device), (torch.arange(width)[None, :] < lengths[:, None]).to(device)


def score_batch(model: PreTrainedModel, batch: list[Encoded]) -> list[list[float]]:
    """Summed log-probabilities of every continuation of every prompt in `batch`.

    One forward pass over the prompts keeps their key/value cache and the next-token distribution after
    each prompt (which scores every continuation's first token); a second pass runs all continuations
    that have more tokens at once, each attending to its own prompt's cache.
    """
    device = model.device
    context_ids, context_mask = _pad([e.context for e in batch], device)
    lengths = context_mask.sum(1)
    out = model(input_ids=context_ids, use_cache=True, logits_to_keep=(lengths - 1)[:, None])
    after_context = torch.log_softmax(out.logits[:, 0].float(), dim=-1)
    owner = torch.tensor([i for i, e in enumerate(batch) for _ in e.continuations], device=device)
    conts = [c for e in batch for c in e.continuations]
    scores = after_context[owner, torch.tensor([c[0] for c in conts], device=device)].double()
    longer = [j for j, c in enumerate(conts) if len(c) > 1]
    if longer:
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        cache.batch_select_indices(owner[longer])
        inputs, input_mask = _pad([conts[j][:-1] for j in longer], device)
        targets, _ = _pad([conts[j][1:] for j in longer], device)
        positions = lengths[owner[longer], None] + torch.arange(inputs.shape[1], device=device)[None, :]
        logits = model(
            input_ids=inputs,
            attention_mask=torch.cat([context_mask[owner[longer]], input_mask], dim=1).long(),
            position_ids=positions,
            **{_cache_argument(model): cache},
        ).logits
        token_scores = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
        scores[longer] += (token_scores * input_mask).sum(1).double()
    per_item = scores.tolist()
    result, start = [], 0
    for e in batch:
        result.append(per_item[start : start + len(e.continuations)])
        start += len(e.continuations)
    return result


def _cache_argument(model: PreTrainedModel) -> str:
    """The forward argument for a key/value cache: `cache` in newer transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def loglikelihoods(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[tuple[str, list[str]]],
    batch_size: int = 8,
    what: str = "scoring",
) -> list[list[float]]:
    """Log-likelihood of each continuation given its context, for `(context, continuations)` requests.

    The same numbers as lm-eval's `loglikelihood` on the `(context, continuations)` pairs; prompts are
    batched `batch_size` at a time, longest first. Progress (`what`) is a bar in a terminal, lines in a log file.
    """
    model.eval()
    max_length = context_length(model, tokenizer)
    encoded = [encode_request(tokenizer, ctx, conts, max_length) for ctx, conts in requests]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].context))
    results: list[list[float]] = [[] for _ in encoded]
    with Progress(what, math.ceil(len(order) / batch_size), "batches", logger=logger, say_done=False) as progress:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, scores in zip(chunk, score_batch(model, [encoded[i] for i in chunk]), strict=True):
                results[i] = scores
            progress.update()
    return results


def predictions(task: MultipleChoiceTask, scores: list[list[float]]) -> list[dict[str, Any]]:
    """Per question: the right index, the chosen ones (raw and length-normalized) and the log-likelihoods."""
    rows = []
    for index, (item, lls) in enumerate(zip(task.items, scores, strict=True)):
        lengths = np.array([float(len(c)) for c in item.choices])
        rows.append({
            "index": index,
            "gold": item.gold,
            "pred": int(np.argmax(lls)),
            "pred_norm": int(np.argmax(np.array(lls) / lengths)),
            "loglikelihoods": lls,
        })
    return rows


def _mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error (sample standard deviation / sqrt(n)), as lm-eval reports them."""
    stderr = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return statistics.fmean(values), stderr


def score_task(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: MultipleChoiceTask, batch_size: int = 8
) -> dict[str, Any]:
    """acc, acc_norm (with standard errors) and per-question predictions of `model` on `task`."""
    rows = predictions(task, loglikelihoods(model, tokenizer, task.requests(), batch_size, what=task.name))
    acc, acc_stderr = _mean_and_stderr([float(r["pred"] == r["gold"]) for r in rows])
    acc_norm, acc_norm_stderr = _mean_and_stderr([float(r["pred_norm"] == r["gold"]) for r in rows])
    return {
        "task": task.name,
        "label": task.label or task.name,
        "domain": task.domain,
        "num_fewshot": task.num_fewshot,
        "questions": len(rows),
        "acc": acc,
        "acc_stderr": acc_stderr,
        "acc_norm": acc_norm,
        "acc_norm_stderr": acc_norm_stderr,
        "predictions": rows,
    }


def run_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task_names: list[str | MultipleChoiceTask],
    eval_cfg: EvalConfig,
) -> dict[str, dict[str, Any]]:
    """Score `model` on each task (a name, or a task already loaded) with the `eval:` section's settings.

    Names are loaded with its few-shot count and limit; every task is scored in batches of `batch_size`
    questions. Returns `score_task`'s result per task name.
    """
    results = {}
    for task in task_names:
        if not isinstance(task, MultipleChoiceTask):
            task = load_task(task, eval_cfg.num_fewshot, eval_cfg.limit)
        logger.info("%s: scoring %d questions, %d-shot", task.name, len(task.items), task.num_fewshot)
        started = time.monotonic()
        results[task.name] = summary = score_task(model, tokenizer, task, eval_cfg.batch_size)
        logger.info("%s: acc=%.4f acc_norm=%.4f (scored in %s)", task.name, summary["acc"], summary["acc_norm"],
                    duration(time.monotonic() - started))
    return results


def markdown_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The card's table: `Dataset | Domain | one column per model`, acc_norm with the best of a row in bold.

    `results` maps a model's name to what `run_tasks` returned for it.
    """
    models = list(results)
    header = "| Dataset | Domain | " + " | ".join(models) + " |"
    rule = "|" + "|".join([":---:"] * (len(models) + 2)) + "|"
    tasks = list(dict.fromkeys(t for per_model in results.values() for t in per_model))
    lines = [header, rule]
    for task in tasks:
        first = next(r[task] for r in results.values() if task in r)
        values = [results[m][task]["acc_norm"] if task in results[m] else None for m in models]
        best = max((v for v in values if v is not None), default=None)
        bold = len(models) > 1
        cells = ["-" if v is None else f"**{v:.3f}**" if bold and v == best else f"{v:.3f}" for v in values]
        name = f"{first['label']} ({first['num_fewshot']}-shot)"
        lines.append(f"| {name} | {first['domain'] or '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
