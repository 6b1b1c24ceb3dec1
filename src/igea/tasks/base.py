"""What every task is made of: questions (`Item`), their few-shot examples, prompt templates, and data reading.

Built-in, local and lm-eval tasks all end up as a `MultipleChoiceTask` whose items hold their whole prompt
(description, few-shot examples, question), so scoring never needs to know where a task came from.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from datasets import Dataset, load_dataset

from igea.data import datasets_offline, file_format
from igea.errors import IgeaError
from igea.hub import hub_reachable

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

T = TypeVar("T")


@dataclass(frozen=True)
class Item:
    """One question: the prompt the model continues, the choices' texts and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass
class MultipleChoiceTask:
    """Questions to score; each item's `context` already holds its few-shot examples (`num_fewshot` of them).

    A choice is scored as the continuation `target_delimiter + choice` of its item's context.
    """

    name: str
    items: list[Item]
    num_fewshot: int = 0
    label: str | None = None
    domain: str = ""
    target_delimiter: str = " "

    def requests(self) -> list[tuple[str, list[str]]]:
        """(context, continuations) per item: each continuation is `target_delimiter + choice`."""
        delimiter = self.target_delimiter
        return [(item.context, [delimiter + c for c in item.choices]) for item in self.items]


# ----------------------------------------------------------------------------------------------------------
# Few-shot examples and prompts


def sample_examples(pool: Sequence[T], n: int, exclude: T | None = None, rnd: random.Random | None = None) -> list[T]:
    """`n` few-shot examples from `pool`, never one equal to `exclude`, as lm-eval's samplers draw them.

    Without `rnd`, the first `n` (lm-eval's `first_n` sampler); with it, a random draw of `n + 1` minus
    `exclude` (lm-eval's `default` sampler, whose generator lm-eval seeds with 1234 once per task).
    """
    if n == 0:
        return []
    if rnd is None:
        return list(itertools.islice((x for x in pool if x != exclude), n)) if exclude is not None else list(pool[:n])
    if exclude is None:
        return rnd.sample(pool, n)
    drawn = [x for x in rnd.sample(pool, n + 1) if x != exclude][:n]
    if len(drawn) < n:  # copies of `exclude` were drawn: draw again from the pool without them
        drawn = rnd.sample([x for x in pool if x != exclude], n)
    return drawn


def with_examples(
    items: list[Item], pool: list[Item], shots_from_items: bool, n: int,
    target_delimiter: str = " ", fewshot_delimiter: str = "\n\n",
) -> list[Item]:
    """Each item with the first `n` of `pool` before it, each `question + delimiter + answer + "\\n\\n"`.

    As lm-eval, a question is never shown as its own example when examples come from its own split.
    """
    if n == 0:
        return items
    out = []
    for item in items:
        shots = sample_examples(pool, n, item if shots_from_items else None)
        examples = "".join(f"{s.context}{target_delimiter}{s.choices[s.gold]}{fewshot_delimiter}" for s in shots)
        out.append(Item(examples + item.context, item.choices, item.gold))
    return out


def lettered(question: str, options: list[Any], header: str = "") -> str:
    """`question`, then `A. option` lines (after `header`), then `Answer:`: MedMCQA's and MMLU's prompt."""
    lines = "".join(f"{letter}. {option}\n" for letter, option in zip(LETTERS, options, strict=False))
    return f"{question}\n{header}{lines}Answer:"


@functools.lru_cache(maxsize=256)
def _template(text: str):
    """A Jinja template compiled as lm-eval compiles its prompts (undefined names are errors)."""
    from jinja2 import BaseLoader, Environment, StrictUndefined

    env = Environment(loader=BaseLoader(), undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    return env.from_string(text)


def render(template: str, row: dict[str, Any], key: str) -> str:
    """`template` rendered over a row's columns; a bad template or a missing column is a ValueError naming `key`."""
    from jinja2 import TemplateError

    try:
        return _template(template).render(**row)
    except TemplateError as err:
        raise ValueError(f"{key}: {err.message or type(err).__name__} in template {template!r}") from None


def answer_index(value: Any, choices: list[str]) -> int:
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
# Reading rows


def read_file(path: str, name: str, **kwargs: Any) -> Dataset:
    """The rows of a local .jsonl/.json/.csv/.parquet file, errors as one line naming task and file."""
    if not Path(path).is_file():
        raise IgeaError(f"task '{name}': file '{path}' does not exist")
    builder = file_format(path)
    if builder == "text":
        raise IgeaError(f"task '{name}': '{path}' must be a .jsonl, .json, .csv or .parquet file")
    try:
        return load_dataset(builder, data_files=[path], split="train", **kwargs)
    except Exception as err:  # datasets wraps reader errors in DatasetGenerationError
        raise read_error(err, name, path) from err


def read_error(err: Exception, name: str, where: str) -> IgeaError:
    """A reader's exception as one line: a file without rows, or the reader's first line."""
    if isinstance(err, StopIteration) or "corresponds to no data" in str(err):  # a file without rows
        return IgeaError(f"task '{name}': '{where}' has no questions")
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return IgeaError(f"task '{name}': cannot read '{where}': {reason}")


def read_hub(name: str, path: str, config_name: str | None, split: str, hint: str = "", **kwargs: Any) -> Dataset:
    """A split of a hub dataset; an unreachable hub is one line at once (huggingface_hub would retry for ~25 s)."""
    unreachable = f"task '{name}': cannot load '{path}' from the Hugging Face hub"
    if not hub_reachable() and not datasets_offline():
        raise IgeaError(f"{unreachable} (unreachable; set HF_HUB_OFFLINE=1 to use a cached copy){hint}")
    try:
        return load_dataset(path, config_name, split=split, **kwargs)
    except (ConnectionError, OSError) as err:
        raise IgeaError(f"{unreachable} (offline, wrong id, or not in the cache){hint}") from err
    except ValueError as err:
        raise IgeaError(f"task '{name}': cannot load '{path}': {str(err).splitlines()[0]}") from err


def first_rows(dataset: Dataset, count: int | None, columns: Sequence[str], where: str) -> list[dict[str, Any]]:
    """The first `count` rows (all when None) as dicts, after checking that `columns` are there."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        have = ", ".join(dataset.column_names)
        raise IgeaError(f"{where}: column '{missing[0]}' is missing; its columns are: {have}")
    if count is not None:
        dataset = dataset.select(range(min(count, len(dataset))))
    return dataset.to_list()


def checked(to_item: Callable[[dict[str, Any]], Item], row: dict[str, Any], where: str) -> Item:
    """`to_item(row)`, with a bad row (wrong type, bad answer, bad template) reported as one line naming it."""
    try:
        item = to_item(row)
    except (ValueError, TypeError, AttributeError) as err:
        raise IgeaError(f"{where}: {err}") from None
    if not 0 <= item.gold < len(item.choices):
        raise IgeaError(f"{where}: answer {item.gold} is out of range: there are {len(item.choices)} choices")
    return item


def build_task(
    name: str, items: list[Item], pool: list[Item], shots_from_items: bool, shots: int, label: str, domain: str,
    source: str,
) -> MultipleChoiceTask:
    """The task of `items` with the first `shots` of `pool` before each, once checked there are enough."""
    if not items:
        raise IgeaError(f"task '{name}': '{source}' has no questions")
    available = len(pool) - 1 if shots_from_items else len(pool)
    if shots and available < shots:
        raise IgeaError(f"task '{name}': num_fewshot={shots} but only {max(available, 0)} examples can be shown")
    return MultipleChoiceTask(name, with_examples(items, pool, shots_from_items, shots), shots, label, domain)
