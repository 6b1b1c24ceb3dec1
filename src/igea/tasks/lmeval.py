"""lm-evaluation-harness task YAMLs (`output_type: multiple_choice`) read as igea tasks, prompts byte for byte.

The prompt of a question is what lm-eval 0.4's `ConfigurableTask.fewshot_context` builds: the `description`
(rendered over the question's row), the few-shot examples (`doc_to_text + target_delimiter + answer +
fewshot_delimiter` each), then `doc_to_text`; each choice is scored as `target_delimiter + choice`.
`doc_to_text`, `doc_to_choice` and `doc_to_target` are a column name or a Jinja template (rendered as lm-eval
renders it); `doc_to_choice` may be a list, `doc_to_target` an index. Few-shot examples come from
`fewshot_split`, else the training, validation or test split, drawn as lm-eval draws them: at random with
lm-eval's seed (1234) by default, or the first n with `fewshot_config: {sampler: first_n}`.
Python code (`!function`), `include`, groups and generation tasks are refused with the key named.
"""

from __future__ import annotations

import ast
import glob
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from datasets import Dataset, load_dataset

from igea.config import build_section
from igea.errors import ConfigError, IgeaError
from igea.tasks.base import Item, MultipleChoiceTask, checked, read_error, read_hub, render, sample_examples

LOCAL_BUILDERS = ("json", "csv", "parquet")
FEWSHOT_SEED = 1234  # lm-eval's `fewshot_random_seed` default (simple_evaluate, `lm_eval --fewshot_seed`)
SAMPLERS = ("default", "first_n")
METRICS = ("acc", "acc_norm")
DATASET_KWARGS = ("data_files", "data_dir", "revision", "trust_remote_code")

_CODE = "it runs Python code, which igea does not; write a Jinja template or a column name instead"
UNSUPPORTED: dict[str, str] = {
    "include": "igea reads one file; copy the keys of the included file into this one",
    "group": "a group of tasks is not supported; list each task file instead",
    "group_alias": "a group of tasks is not supported; list each task file instead",
    "aggregate_metric_list": "a group of tasks is not supported; list each task file instead",
    "class": _CODE,
    "custom_dataset": _CODE,
    "process_docs": _CODE,
    "process_results": _CODE,
    "use_prompt": "promptsource prompts are not supported; write doc_to_text",
    "doc_to_image": "multimodal tasks are not supported",
    "doc_to_audio": "multimodal tasks are not supported",
    "generation_kwargs": "igea scores multiple_choice tasks only",
    "filter_list": "filters apply to generated answers; igea scores multiple_choice tasks only",
    "gen_prefix": "a generation prefix is not supported",
    "repeats": "repeated requests are not supported",
    "unsafe_code": _CODE,
}
"""lm-eval task keys that change what is scored in ways igea does not reproduce: each is refused."""


@dataclass
class FewshotSpec:
    """lm-eval's `fewshot_config`: how examples are drawn, and formatting that differs from the question's."""

    sampler: str = "default"
    split: str | None = None
    doc_to_text: str | None = None
    doc_to_choice: str | list[str] | dict[str, Any] | None = None
    doc_to_target: str | int | None = None
    target_delimiter: str | None = None
    fewshot_delimiter: str | None = None


@dataclass
class LmEvalTaskSpec:
    """The keys of an lm-eval task YAML that igea reads (lm-eval's `TaskConfig` names and defaults).

    `task_alias`, `tag`, `metadata`, `should_decontaminate` and `doc_to_decontamination_query` change nothing
    scored and are accepted; `metric_list` may name acc and acc_norm (igea reports both in any case).
    """

    task: str | None = None
    dataset_path: str | None = None
    dataset_name: str | None = None
    dataset_kwargs: dict[str, Any] | None = None
    training_split: str | None = None
    validation_split: str | None = None
    test_split: str | None = None
    fewshot_split: str | None = None
    doc_to_text: str | int | None = None
    doc_to_choice: str | list[str] | dict[str, Any] | None = None
    doc_to_target: str | int | list[Any] | None = None
    description: str | None = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    fewshot_config: FewshotSpec | None = None
    num_fewshot: int | None = None
    output_type: str = "generate_until"
    metric_list: list[dict[str, Any]] | None = None
    task_alias: str | None = None
    tag: str | list[str] | None = None
    metadata: dict[str, Any] | None = None
    should_decontaminate: bool = False
    doc_to_decontamination_query: str | None = None


KEYS = frozenset(f.name for f in fields(LmEvalTaskSpec)) | frozenset(UNSUPPORTED)
"""Every key that marks a YAML file as an lm-eval task file."""


def lm_eval_task_spec(path: str | Path, raw: dict[str, Any]) -> LmEvalTaskSpec:
    """The task an lm-eval task YAML's mapping `raw` describes, every key checked (one ConfigError naming it)."""
    where = f"task file '{path}'"
    for key in raw:
        if key in UNSUPPORTED:
            raise ConfigError(f"{where}: lm-eval key '{key}' is not supported: {UNSUPPORTED[key]}")
    if isinstance(raw.get("task"), list):
        raise ConfigError(f"{where}: task: a list of tasks is a group, which is not supported; one task per file")
    try:
        spec = build_section(LmEvalTaskSpec, raw, "")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    spec.task = spec.task or Path(path).stem
    if spec.output_type != "multiple_choice":
        given = "output_type is not set (lm-eval's default is generate_until)" if "output_type" not in raw else (
            f"output_type is {spec.output_type!r}")
        raise ConfigError(f"{where}: {given}; igea scores multiple_choice tasks only")
    for key in ("dataset_path", "doc_to_text", "doc_to_choice", "doc_to_target"):
        if getattr(spec, key) is None:
            raise ConfigError(f"{where}: missing required key '{key}'")
    if isinstance(spec.doc_to_text, int):
        raise ConfigError(f"{where}: doc_to_text: {spec.doc_to_text!r} means one context per choice "
                          "(like winogrande), which is not supported")
    if isinstance(spec.doc_to_target, list):
        raise ConfigError(f"{where}: doc_to_target: a list means several right answers, which is not supported")
    if spec.test_split is None and spec.validation_split is None:
        raise ConfigError(f"{where}: set test_split or validation_split (the questions to score)")
    if spec.num_fewshot is not None and spec.num_fewshot < 0:
        raise ConfigError(f"{where}: num_fewshot: {spec.num_fewshot!r} is not allowed; it must be >= 0")
    sampler = (spec.fewshot_config or FewshotSpec()).sampler
    if sampler not in SAMPLERS:
        raise ConfigError(f"{where}: fewshot_config.sampler: {sampler!r} is not allowed; choose one of "
                          f"{', '.join(SAMPLERS)}")
    for i, metric in enumerate(spec.metric_list or []):
        if metric.get("metric") not in METRICS:
            raise ConfigError(f"{where}: metric_list[{i}].metric: {metric.get('metric')!r} is not computed by "
                              f"igea; it reports {' and '.join(METRICS)}")
    _check_dataset(spec, where)
    return spec


def _check_dataset(spec: LmEvalTaskSpec, where: str) -> None:
    """dataset_kwargs holds what igea passes to `datasets.load_dataset`; a local builder's files exist."""
    kwargs = spec.dataset_kwargs or {}
    for key in kwargs:
        if key not in DATASET_KWARGS:
            raise ConfigError(f"{where}: dataset_kwargs.{key} is not supported; allowed: {', '.join(DATASET_KWARGS)}")
    if spec.dataset_path not in LOCAL_BUILDERS:
        return
    files = kwargs.get("data_files")
    if not files:
        raise ConfigError(f"{where}: dataset_path '{spec.dataset_path}' needs dataset_kwargs.data_files "
                          "(the question files)")
    by_split = files if isinstance(files, dict) else {"train": files}
    for paths in by_split.values():
        for name in paths if isinstance(paths, list) else [paths]:
            if not isinstance(name, str):
                raise ConfigError(f"{where}: dataset_kwargs.data_files: expected file paths, got {name!r}")
            if not glob.glob(str(Path(name).expanduser())):
                raise ConfigError(f"{where}: dataset_kwargs.data_files: '{name}' does not exist (relative paths "
                                  "are read from the current directory, as lm-eval reads them)")


# ----------------------------------------------------------------------------------------------------------
# Loading: lm-eval's doc_to_text / doc_to_choice / doc_to_target and few-shot context, row by row


def load_lm_eval_task(
    spec: LmEvalTaskSpec, num_fewshot: int | None = None, limit: int | None = None
) -> MultipleChoiceTask:
    """The task of an lm-eval task file: its first `limit` questions, `num_fewshot` (None: the file's) examples."""
    name = spec.task or "task"
    shots = num_fewshot if num_fewshot is not None else spec.num_fewshot or 0
    fewshot = spec.fewshot_config or FewshotSpec()
    split = spec.test_split if spec.test_split is not None else spec.validation_split
    dataset = _read_split(spec, name, split)
    columns = set(dataset.column_names)
    docs = (dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset).to_list()
    if not docs:
        raise IgeaError(f"task '{name}': split '{split}' of '{spec.dataset_path}' has no questions")
    question = _Format(spec.doc_to_text, spec.doc_to_choice, spec.doc_to_target, columns)
    example = _Format(fewshot.doc_to_text or spec.doc_to_text, fewshot.doc_to_choice or spec.doc_to_choice,
                      fewshot.doc_to_target if fewshot.doc_to_target is not None else spec.doc_to_target, columns)
    delimiters = (fewshot.target_delimiter if fewshot.target_delimiter is not None else spec.target_delimiter,
                  fewshot.fewshot_delimiter if fewshot.fewshot_delimiter is not None else spec.fewshot_delimiter)
    pool: list[dict[str, Any]] = []
    pool_split = next(s for s in (fewshot.split or spec.fewshot_split, spec.training_split,
                                  spec.validation_split, spec.test_split) if s is not None)
    exclude_self = (fewshot.split or spec.fewshot_split) == spec.test_split  # lm-eval's rule, None == None too
    rnd = random.Random(FEWSHOT_SEED) if fewshot.sampler == "default" else None
    if shots:
        pool = _read_split(spec, name, pool_split).to_list()  # its own rows: equal to, never the same as, docs
        needed = shots + 1 if exclude_self and rnd is not None else shots
        if len(pool) < needed:
            raise IgeaError(f"task '{name}': num_fewshot={shots} but split '{pool_split}' has only "
                            f"{len(pool)} examples")

    def to_item(doc: dict[str, Any]) -> Item:
        examples = ""
        if shots:
            drawn = sample_examples(pool, shots, doc if exclude_self else None, rnd)
            if len(drawn) < shots:
                raise ValueError(f"num_fewshot={shots} but only {len(drawn)} other examples in '{pool_split}'")
            examples = "".join(example.example(s, *delimiters) for s in drawn)
        choices = question.choices(doc)
        return Item(_description(spec.description, doc) + examples + question.text(doc), tuple(choices),
                    question.gold(doc, choices))

    where = f"task '{name}': {spec.dataset_path} ({split})"
    items = [checked(to_item, doc, f"{where} row {i}") for i, doc in enumerate(docs)]
    return MultipleChoiceTask(name, items, shots, spec.task_alias or name, "", spec.target_delimiter)


def _read_split(spec: LmEvalTaskSpec, name: str, split: str) -> Dataset:
    kwargs = {k: v for k, v in (spec.dataset_kwargs or {}).items() if k != "trust_remote_code"}  # as lm-eval
    path = spec.dataset_path or ""
    if path in LOCAL_BUILDERS or Path(path).expanduser().is_dir():
        try:
            return load_dataset(path, spec.dataset_name, split=split, **kwargs)
        except Exception as err:  # datasets wraps reader errors in DatasetGenerationError
            raise read_error(err, name, f"{path} ({split})") from err
    return read_hub(name, path, spec.dataset_name, split, **kwargs)


def _description(description: str | None, doc: dict[str, Any]) -> str:
    """lm-eval's `resolve_field`: a column's value, else a template over the row; put before the examples."""
    if not description:
        return ""
    value = doc[description] if description in doc else render(description, doc, "description")
    if not isinstance(value, str):
        raise ValueError(f"description gives {value!r}, not text")
    return value


@dataclass
class _Format:
    """lm-eval's `doc_to_text`, `doc_to_choice` and `doc_to_target` of one row (a question or an example)."""

    doc_to_text: str | int | None
    doc_to_choice: str | list[str] | dict[str, Any] | None
    doc_to_target: str | int | list[Any] | None
    columns: set[str]

    def text(self, doc: dict[str, Any]) -> str:
        key = self.doc_to_text
        if key in self.columns:
            value = doc[key]
        else:
            value = render(str(key), doc, "doc_to_text")
            if value.isdigit():  # lm-eval reads a number as the index of one context per choice
                raise ValueError(f"doc_to_text gives {value!r}: one context per choice (like winogrande) "
                                 "is not supported")
        if not isinstance(value, str):
            raise ValueError(f"doc_to_text gives {value!r}, not text")
        return value

    def choices(self, doc: dict[str, Any]) -> list[str]:
        spec = self.doc_to_choice
        if isinstance(spec, list):
            value: Any = spec
        elif isinstance(spec, dict):
            value = list(spec.values())
        elif spec in self.columns:
            value = doc[spec]
        else:
            text = render(str(spec), doc, "doc_to_choice")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, TypeError):
                raise ValueError(f"doc_to_choice gives {text!r}, not a list (e.g. \"{{{{[opa, opb]}}}}\")") from None
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise ValueError(f"doc_to_choice gives {value!r}, not a list of texts")
        if not value:
            raise ValueError("doc_to_choice gives no choices")
        return value

    def target(self, doc: dict[str, Any]) -> Any:
        spec = self.doc_to_target
        if isinstance(spec, int):
            return spec
        if spec in self.columns:
            return doc[spec]
        text = render(str(spec), doc, "doc_to_target")
        if text.isdigit():
            return int(text)
        if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
            try:
                return ast.literal_eval(text)
            except (SyntaxError, ValueError):
                return text
        return text

    def gold(self, doc: dict[str, Any], choices: list[str]) -> int:
        """The right choice's index: the target is an index, or the text of a choice (as lm-eval reads it)."""
        target = self.target(doc)
        if isinstance(target, float) and target.is_integer():
            target = int(target)
        if isinstance(target, int):
            if not 0 <= target < len(choices):
                raise ValueError(f"answer {target} is out of range: there are {len(choices)} choices")
            return target
        if isinstance(target, str) and target in choices:
            return choices.index(target)
        raise ValueError(f"doc_to_target gives {target!r}, not an index or one of the choices {choices!r}")

    def example(self, doc: dict[str, Any], target_delimiter: str, fewshot_delimiter: str) -> str:
        """A few-shot example: question, delimiter, answer, delimiter (lm-eval's `build_qa_turn`)."""
        question, answer = self.text(doc), self.target(doc)
        if answer is None or answer == "":
            return question
        if isinstance(answer, int) and self.doc_to_choice:
            choices = self.choices(doc)
            if not -len(choices) <= answer < len(choices):
                raise ValueError(f"answer {answer} is out of range: there are {len(choices)} choices")
            answer = choices[answer]
        elif isinstance(answer, list):
            answer = answer[0]
        if not isinstance(answer, str):
            raise ValueError(f"doc_to_target gives {answer!r} for a few-shot example, not text")
        return question + target_delimiter + answer + fewshot_delimiter
