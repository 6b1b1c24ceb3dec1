"""Local tasks: a question file (jsonl / json / csv / parquet), alone or described by an igea `.yaml` task file.

A question file alone uses the columns `question`, `choices` (a list) and `answer`; a task file names other
columns, the prompt style or a Jinja `prompt:` template, and a file of few-shot examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igea.config import build_section
from igea.errors import ConfigError
from igea.tasks.base import (
    LETTERS,
    Item,
    MultipleChoiceTask,
    answer_index,
    build_task,
    checked,
    first_rows,
    lettered,
    read_file,
    render,
)
from igea.tasks.registry import BUILTIN_TASKS

STYLES = ("text", "letters")


@dataclass
class LocalTaskSpec:
    """A multiple-choice task from a local file: which columns hold the question, the choices and the answer.

    `choices` names one column holding a list, or one column per option (trailing empty options are
    dropped). `answer` holds a 0-based index, a letter (A = first choice) or the right choice's text.
    `style: text` scores the choices' texts after `Question: ...\\nAnswer:` (as ARC does); `style: letters`
    lists the options and scores their letters (as MedMCQA does). `prompt` replaces either prompt by a Jinja
    template over the row's columns (e.g. `Domanda: {{question}}\\nRisposta:`). A built-in task's name as
    `style` reads a local copy of that benchmark (its own columns and prompt; the column mapping is not used).
    """

    path: str
    name: str | None = None
    question: str = "question"
    choices: str | list[str] = "choices"
    answer: str = "answer"
    style: str = "text"
    prompt: str | None = None
    fewshot_path: str | None = None
    num_fewshot: int | None = None
    label: str | None = None
    domain: str | None = None


def local_task_spec(path: str | Path, raw: dict[str, Any] | None = None) -> LocalTaskSpec:
    """The task a `.yaml` task file's mapping `raw` describes (paths relative to the file), or, without
    `raw`, a question file's default columns."""
    path = Path(path).expanduser()
    if raw is None:
        return LocalTaskSpec(path=str(path))
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
    gold = answer_index(row[spec.answer], choices)
    scored = tuple(LETTERS[: len(choices)]) if spec.style == "letters" else tuple(choices)
    if spec.prompt is not None:
        return Item(render(spec.prompt, row, "prompt"), scored, gold)
    if spec.style == "letters":
        return Item(lettered(f"Question: {row[spec.question]}", choices, "Choices:\n"), scored, gold)
    return Item(f"Question: {row[spec.question]}\nAnswer:", scored, gold)


def load_local_task(
    spec: LocalTaskSpec, num_fewshot: int | None = None, limit: int | None = None
) -> MultipleChoiceTask:
    """The task of a `LocalTaskSpec` (the Python form of a `.yaml` task file).

    `num_fewshot` (None: the spec's, else 0) and `limit` (the first questions only) decide what is read.
    """
    name = spec.name or Path(spec.path).stem
    if spec.style in BUILTIN_TASKS:
        if spec.prompt is not None:
            raise ConfigError(f"task '{name}': prompt is for styles text and letters; "
                              f"style {spec.style!r} uses that benchmark's own prompt")
        hub = BUILTIN_TASKS[spec.style]
        columns, to_item = hub.columns, hub.to_item
        defaults = (hub.num_fewshot, hub.label, hub.domain)
    elif spec.style in STYLES:
        option_columns = [spec.choices] if isinstance(spec.choices, str) else list(spec.choices)
        question = () if spec.prompt is not None else (spec.question,)  # a template names its own columns
        columns = (*question, *option_columns, spec.answer)
        defaults = (0, name, "")

        def to_item(row: dict[str, Any]) -> Item:
            return _local_item(row, spec)
    else:
        allowed = ", ".join(STYLES + tuple(sorted(BUILTIN_TASKS)))
        raise ConfigError(f"task '{name}': style {spec.style!r} is not allowed; choose one of {allowed}")
    shots = next(n for n in (num_fewshot, spec.num_fewshot, defaults[0]) if n is not None)

    def read(path: str, count: int | None) -> list[Item]:
        where = f"task '{name}': '{path}'"
        rows = first_rows(read_file(path, name), count, columns, where)
        return [checked(to_item, row, f"{where} row {i}") for i, row in enumerate(rows)]

    items = read(spec.path, limit)
    pool = read(spec.fewshot_path or spec.path, shots + 1) if shots else []
    label, domain = spec.label or defaults[1], spec.domain if spec.domain is not None else defaults[2]
    return build_task(name, items, pool, spec.fewshot_path is None, shots, label, domain, spec.path)
