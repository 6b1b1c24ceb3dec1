"""Built-in tasks: the lm-eval definitions of the benchmarks in the Igea card, read from the hub.

Prompts, splits and answers follow lm-eval's `medmcqa` and okapi (`arc_it`, `hellaswag_it`, `m_mmlu_it`)
tasks, so the numbers are those lm-eval reports; few-shot examples are the first n of the few-shot split.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from igea.tasks.base import (
    LETTERS,
    Item,
    MultipleChoiceTask,
    answer_index,
    build_task,
    checked,
    first_rows,
    lettered,
    read_hub,
)


def _medmcqa_item(row: dict[str, Any]) -> Item:
    """lm-eval `medmcqa`: options listed under `Choices:`, the answer is a letter, `cop` its index."""
    options = [row["opa"], row["opb"], row["opc"], row["opd"]]
    letters = list(LETTERS[:4])
    prompt = lettered(f"Question: {row['question']}", options, "Choices:\n")
    return Item(prompt, tuple(letters), answer_index(row["cop"], letters))


def _okapi_clean(text: str) -> str:
    """okapi's `preprocess`: drop WikiHow's `[title]`-style markers and one level of double spaces."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _arc_item(row: dict[str, Any]) -> Item:
    """lm-eval `arc_it`: `Question: ...\\nAnswer:`, the choices are the (non-empty) option texts."""
    choices = [_okapi_clean(o) for o in (row[f"option_{x}"] for x in "abcde") if o]
    return Item(f"Question: {_okapi_clean(row['instruction'])}\nAnswer:", tuple(choices),
                answer_index(row["answer"], choices))


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
    prompt = lettered(row["instruction"].strip(), options)
    return Item(prompt, tuple(letters), answer_index(row["answer"], letters))


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
"""The card's benchmarks, with its few-shot counts (MMLU-IT 5-shot, the others 0-shot); their names are
`igea.config.BUILTIN_TASK_NAMES`, which the config checks `eval.tasks` against."""


def load_builtin_task(name: str, num_fewshot: int | None = None, limit: int | None = None) -> MultipleChoiceTask:
    """A built-in task from the hub: its first `limit` questions, `num_fewshot` (None: its own count) examples."""
    hub = BUILTIN_TASKS[name]
    shots = hub.num_fewshot if num_fewshot is None else num_fewshot
    hint = f"; for a local copy, use a .yaml task file with 'style: {name}'"

    def read(split: str, count: int | None) -> list[Item]:
        where = f"task '{name}': {hub.path} ({split})"
        rows = first_rows(read_hub(name, hub.path, hub.config_name, split, hint), count, hub.columns, where)
        return [checked(hub.to_item, row, f"{where} row {i}") for i, row in enumerate(rows)]

    items = read(hub.split, limit)
    pool = read(hub.fewshot_split or hub.split, shots + 1) if shots else []
    return build_task(name, items, pool, hub.fewshot_split is None, shots, hub.label, hub.domain, hub.path)
