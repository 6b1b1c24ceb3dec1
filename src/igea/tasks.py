"""Multiple-choice benchmarks scored by log-likelihood, as lm-evaluation-harness scores them.

A task is a list of questions, each a prompt (`Item.context`) and its choices. A choice is scored by the
summed log-probability of `target_delimiter + choice` after the prompt (and any few-shot examples before it);
`acc` takes the best-scored choice, `acc_norm` the best score divided by the choice's length in characters.
Prompts, splits and tokenization follow lm-eval's `medmcqa` and okapi (`arc_it`, `hellaswag_it`, `m_mmlu_it`)
tasks, so the numbers are those lm-eval reports; few-shot examples are the first n of the few-shot split.

Scoring runs the model once over each prompt and then over all of its choices at once, reusing the prompt's
key/value cache, instead of once per (prompt, choice) pair.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from datasets import Dataset, load_dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from igea.config import EvalConfig, build_section
from igea.data import file_format
from igea.errors import ConfigError, IgeaError

logger = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
TASK_FILE_SUFFIXES = (".yaml", ".yml")
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
DEFAULT_MAX_LENGTH = 2048  # lm-eval's context length when neither the model nor the tokenizer names one


@dataclass(frozen=True)
class Item:
    """One question: the prompt the model continues, the choices' texts and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass
class MultipleChoiceTask:
    """Questions to score, with the examples shown before each one (`num_fewshot` of them)."""

    name: str
    items: list[Item]
    shots: list[Item] = field(default_factory=list)
    shots_from_items: bool = False  # shots come from the evaluated split: a question never shows itself
    num_fewshot: int = 0
    label: str | None = None
    domain: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"

    def context(self, item: Item) -> str:
        """The prompt of `item` after its few-shot examples, each `question + delimiter + answer + "\\n\\n"`.

        As lm-eval, a question is never shown as its own example when examples come from its own split.
        """
        pool = [s for s in self.shots if s != item] if self.shots_from_items else self.shots
        examples = "".join(
            f"{s.context}{self.target_delimiter}{s.choices[s.gold]}{self.fewshot_delimiter}"
            for s in pool[: self.num_fewshot]
        )
        return examples + item.context

    def requests(self) -> list[tuple[str, list[str]]]:
        """(context, continuations) per item: each continuation is `target_delimiter + choice`."""
        delimiter = self.target_delimiter
        return [(self.context(item), [delimiter + c for c in item.choices]) for item in self.items]


# ----------------------------------------------------------------------------------------------------------
# Built-in tasks: the lm-eval definitions of the benchmarks in the Igea card


def _lettered(question: str, options: list[Any], header: str = "") -> str:
    lines = "".join(f"{letter}. {option}\n" for letter, option in zip(LETTERS, options, strict=False))
    return f"{question}\n{header}{lines}Answer:"


def _medmcqa_item(row: dict[str, Any]) -> Item:
    """lm-eval `medmcqa`: options listed under `Choices:`, the answer is a letter, `cop` its index."""
    options = [row["opa"], row["opb"], row["opc"], row["opd"]]
    letters = list(LETTERS[:4])
    prompt = _lettered(f"Question: {row['question']}", options, "Choices:\n")
    return Item(prompt, tuple(letters), _answer_index(row["cop"], letters))


def _okapi_clean(text: str) -> str:
    """okapi's `preprocess`: drop WikiHow's `[title]`-style markers and one level of double spaces."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _arc_item(row: dict[str, Any]) -> Item:
    """lm-eval `arc_it`: `Question: ...\\nAnswer:`, the choices are the (non-empty) option texts."""
    choices = [_okapi_clean(o) for o in (row[f"option_{x}"] for x in "abcde") if o]
    return Item(f"Question: {_okapi_clean(row['instruction'])}\nAnswer:", tuple(choices),
                _answer_index(row["answer"], choices))


def _hellaswag_item(row: dict[str, Any]) -> Item:
    """lm-eval `hellaswag_it`: `activity: context`, continued by one of the endings."""
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return Item(
        _okapi_clean(row["activity_label"] + ": " + context),
        tuple(_okapi_clean(e) for e in row["endings"]),
        int(row["label"]),
    )


def _mmlu_item(row: dict[str, Any]) -> Item:
    """lm-eval `m_mmlu_it`: the question and its four options, the answer is a letter."""
    options = [row[f"option_{x}"] for x in "abcd"]
    letters = list(LETTERS[:4])
    prompt = _lettered(row["instruction"].strip(), options)
    return Item(prompt, tuple(letters), _answer_index(row["answer"], letters))


@dataclass(frozen=True)
class HubTask:
    """A benchmark on the Hugging Face hub: where its splits are and how a row becomes an `Item`."""

    label: str
    domain: str
    path: str
    config_name: str | None
    split: str
    fewshot_split: str | None  # None: examples come from `split` itself
    num_fewshot: int
    columns: tuple[str, ...]
    to_item: Callable[[dict[str, Any]], Item]


BUILTIN_TASKS: dict[str, HubTask] = {
    "medmcqa_ita": HubTask("MedMCQA-ITA", "Biomed", "Detsutut/medmcqa-ita", None, "validation", "train", 0,
                           ("question", "opa", "opb", "opc", "opd", "cop"), _medmcqa_item),
    "hellaswag_it": HubTask("Hellaswag-IT", "General", "alexandrainst/m_hellaswag", "it", "val", None, 0,
                            ("activity_label", "ctx_a", "ctx_b", "endings", "label"), _hellaswag_item),
    "arc_it": HubTask("ARC-IT", "General", "alexandrainst/m_arc", "it", "test", "train", 0,
                      ("instruction", "option_a", "option_b", "option_c", "option_d", "option_e", "answer"),
                      _arc_item),
    "mmlu_it": HubTask("MMLU-IT", "General", "alexandrainst/m_mmlu", "it", "test", "train", 5,
                       ("instruction", "option_a", "option_b", "option_c", "option_d", "answer"), _mmlu_item),
}
"""The card's benchmarks, with its few-shot counts (MMLU-IT 5-shot, the others 0-shot)."""


# ----------------------------------------------------------------------------------------------------------
# Local tasks: a jsonl / csv / parquet file and a column mapping


@dataclass
class LocalTaskSpec:
    """A multiple-choice task from a local file: which columns hold the question, the choices and the answer.

    `choices` names one column holding a list, or one column per option (trailing empty options are
    dropped). `answer` holds a 0-based index, a letter (A = first choice) or the right choice's text.
    `style: text` scores the choices' texts after `Question: ...\\nAnswer:` (as ARC does); `style: letters`
    lists the options and scores their letters (as MedMCQA does); a built-in task's name reads a local copy of
    that benchmark (its own columns and prompt; the column mapping is not used).
    """

    path: str
    name: str | None = None
    question: str = "question"
    choices: str | list[str] = "choices"
    answer: str = "answer"
    style: str = "text"
    fewshot_path: str | None = None
    num_fewshot: int | None = None
    label: str | None = None
    domain: str | None = None


STYLES = ("text", "letters")


def local_task_spec(path: str | Path) -> LocalTaskSpec:
    """The task a `.yaml` task file describes (paths relative to it), or a data file's default mapping."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"task file '{path}' does not exist")
    if path.suffix.lower() not in TASK_FILE_SUFFIXES:
        return LocalTaskSpec(path=str(path))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"task file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict) or "path" not in raw:
        raise ConfigError(f"task file '{path}': must be a mapping with at least 'path' (the questions' file)")
    try:
        spec = build_section(LocalTaskSpec, raw, "")
    except ConfigError as err:
        raise ConfigError(f"task file '{path}': {err}") from None
    spec.name = spec.name or path.stem
    spec.path = str(path.parent / Path(spec.path).expanduser())
    if spec.fewshot_path is not None:
        spec.fewshot_path = str(path.parent / Path(spec.fewshot_path).expanduser())
    return spec


def _local_item(row: dict[str, Any], spec: LocalTaskSpec) -> Item:
    raw = row[spec.choices] if isinstance(spec.choices, str) else [row[c] for c in spec.choices]
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"column '{spec.choices}' must hold a list of choices, got {raw!r}")
    options = list(raw)
    while options and options[-1] in (None, ""):
        options.pop()
    if len(options) < 2 or any(o is None or o == "" for o in options):
        raise ValueError(f"needs at least 2 non-empty choices, got {list(raw)!r}")
    choices = [str(o) for o in options]
    gold = _answer_index(row[spec.answer], choices)
    if spec.style == "letters":
        letters = LETTERS[: len(choices)]
        return Item(_lettered(f"Question: {row[spec.question]}", choices, "Choices:\n"), tuple(letters), gold)
    return Item(f"Question: {row[spec.question]}\nAnswer:", tuple(choices), gold)


def _answer_index(value: Any, choices: list[str]) -> int:
    """A 0-based index, a letter or the text of a choice -> the index of the right choice."""
    given = value
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            value = int(text)
        elif len(text) == 1 and text in LETTERS:
            value = LETTERS.index(text)
        elif text in choices:
            value = choices.index(text)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"answer {given!r} is not an index, a letter or one of the choices {choices!r}")
    if not 0 <= value < len(choices):
        raise ValueError(f"answer {given!r} is out of range: there are {len(choices)} choices")
    return value


# ----------------------------------------------------------------------------------------------------------
# Task names and loading


def known_tasks() -> list[str]:
    """Names of the built-in tasks."""
    return sorted(BUILTIN_TASKS)


def check_task_names(names: list[str], key: str = "eval.tasks") -> None:
    """Raise a ConfigError for a name that is neither a built-in task nor an existing task or data file."""
    for name in names:
        if name in BUILTIN_TASKS:
            continue
        if name.lower().endswith(TASK_FILE_SUFFIXES + DATA_FILE_SUFFIXES):
            if not Path(name).expanduser().is_file():
                raise ConfigError(f"{key}: task file '{name}' does not exist")
            continue
        raise ConfigError(
            f"{key}: unknown task '{name}'; known tasks: {', '.join(known_tasks())} "
            "(or a .yaml task file, or a .jsonl/.csv/.parquet file with question, choices and answer columns)"
        )


def load_task(name: str, num_fewshot: int | None = None, limit: int | None = None) -> MultipleChoiceTask:
    """A built-in task by name (from the hub) or a local one (`.yaml` task file or data file).

    `num_fewshot` (None: the task's own count) and `limit` (the first questions only) decide what is read.
    """
    check_task_names([name], key="task")
    if name in BUILTIN_TASKS:
        return _load_hub_task(name, BUILTIN_TASKS[name], num_fewshot, limit)
    return load_local_task(local_task_spec(name), num_fewshot, limit)


def load_local_task(
    spec: LocalTaskSpec, num_fewshot: int | None = None, limit: int | None = None
) -> MultipleChoiceTask:
    """The task of a `LocalTaskSpec` (the Python form of a `.yaml` task file)."""
    name = spec.name or Path(spec.path).stem
    if spec.style in BUILTIN_TASKS:
        hub = BUILTIN_TASKS[spec.style]
        columns, to_item = hub.columns, hub.to_item
        defaults = (hub.num_fewshot, hub.label, hub.domain)
    elif spec.style in STYLES:
        option_columns = [spec.choices] if isinstance(spec.choices, str) else list(spec.choices)
        columns = (spec.question, *option_columns, spec.answer)
        defaults = (0, name, "")

        def to_item(row: dict[str, Any]) -> Item:
            return _local_item(row, spec)
    else:
        allowed = ", ".join(STYLES + tuple(known_tasks()))
        raise ConfigError(f"task '{name}': style {spec.style!r} is not allowed; choose one of {allowed}")
    shots = next(n for n in (num_fewshot, spec.num_fewshot, defaults[0]) if n is not None)

    def read(path: str, count: int | None) -> list[Item]:
        where = f"task '{name}': '{path}'"
        rows = _first_rows(_read_file(path, name), count, columns, where)
        return [_checked(to_item, row, f"{where} row {i}") for i, row in enumerate(rows)]

    items = read(spec.path, limit)
    pool = read(spec.fewshot_path or spec.path, shots + 1) if shots else []
    label, domain = spec.label or defaults[1], spec.domain if spec.domain is not None else defaults[2]
    return _task(name, items, pool, spec.fewshot_path is None, shots, label, domain, spec.path)


def _load_hub_task(name: str, hub: HubTask, num_fewshot: int | None, limit: int | None) -> MultipleChoiceTask:
    shots = hub.num_fewshot if num_fewshot is None else num_fewshot

    def read(split: str, count: int | None) -> list[Item]:
        where = f"task '{name}': {hub.path} ({split})"
        rows = _first_rows(_read_hub(name, hub, split), count, hub.columns, where)
        return [_checked(hub.to_item, row, f"{where} row {i}") for i, row in enumerate(rows)]

    items = read(hub.split, limit)
    pool = read(hub.fewshot_split or hub.split, shots + 1) if shots else []
    return _task(name, items, pool, hub.fewshot_split is None, shots, hub.label, hub.domain, hub.path)


def _checked(to_item: Callable[[dict[str, Any]], Item], row: dict[str, Any], where: str) -> Item:
    """`to_item(row)`, with a bad row (wrong type, bad answer) reported as one line naming it."""
    try:
        item = to_item(row)
    except (ValueError, TypeError, AttributeError) as err:
        raise IgeaError(f"{where}: {err}") from None
    if not 0 <= item.gold < len(item.choices):
        raise IgeaError(f"{where}: answer {item.gold} is out of range: there are {len(item.choices)} choices")
    return item


def _task(name: str, items: list[Item], pool: list[Item], shots_from_items: bool, shots: int, label: str,
          domain: str, source: str) -> MultipleChoiceTask:
    if not items:
        raise IgeaError(f"task '{name}': '{source}' has no questions")
    available = len(pool) - 1 if shots_from_items else len(pool)
    if shots and available < shots:
        raise IgeaError(
            f"task '{name}': num_fewshot={shots} but only {max(available, 0)} examples can be shown"
        )
    return MultipleChoiceTask(name, items, pool, shots_from_items, shots, label, domain)


def _read_file(path: str, name: str) -> Dataset:
    if not Path(path).is_file():
        raise IgeaError(f"task '{name}': file '{path}' does not exist")
    builder = file_format(path)
    if builder == "text":
        raise IgeaError(f"task '{name}': '{path}' must be a .jsonl, .json, .csv or .parquet file")
    try:
        return load_dataset(builder, data_files=[path], split="train")
    except Exception as err:  # datasets wraps reader errors in DatasetGenerationError
        if isinstance(err, StopIteration) or "corresponds to no data" in str(err):  # a file without rows
            raise IgeaError(f"task '{name}': '{path}' has no questions") from err
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise IgeaError(f"task '{name}': cannot read '{path}': {reason}") from err


def _read_hub(name: str, hub: HubTask, split: str) -> Dataset:
    try:
        return load_dataset(hub.path, hub.config_name, split=split)
    except (ConnectionError, OSError) as err:
        raise IgeaError(
            f"task '{name}': cannot load '{hub.path}' from the Hugging Face hub (offline or unreachable); "
            f"for a local copy, use a .yaml task file with 'style: {name}'"
        ) from err
    except ValueError as err:
        raise IgeaError(f"task '{name}': cannot load '{hub.path}': {str(err).splitlines()[0]}") from err


def _first_rows(
    dataset: Dataset, count: int | None, columns: tuple[str, ...], where: str
) -> list[dict[str, Any]]:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        have = ", ".join(dataset.column_names)
        raise IgeaError(f"{where}: column '{missing[0]}' is missing; its columns are: {have}")
    if count is not None:
        dataset = dataset.select(range(min(count, len(dataset))))
    return dataset.to_list()


# ----------------------------------------------------------------------------------------------------------
# Scoring


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
) -> list[list[float]]:
    """Log-likelihood of each continuation given its context, for `(context, continuations)` requests.

    The same numbers as lm-eval's `loglikelihood` on the `(context, continuation)` pairs; prompts are
    batched `batch_size` at a time, longest first.
    """
    model.eval()
    max_length = context_length(model, tokenizer)
    encoded = [encode_request(tokenizer, ctx, conts, max_length) for ctx, conts in requests]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].context))
    results: list[list[float]] = [[] for _ in encoded]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, scores in zip(chunk, score_batch(model, [encoded[i] for i in chunk]), strict=True):
            results[i] = scores
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
    rows = predictions(task, loglikelihoods(model, tokenizer, task.requests(), batch_size))
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
        logger.info("%s: %d questions, %d-shot", task.name, len(task.items), task.num_fewshot)
        results[task.name] = summary = score_task(model, tokenizer, task, eval_cfg.batch_size)
        logger.info("%s: acc=%.4f acc_norm=%.4f", task.name, summary["acc"], summary["acc_norm"])
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
