"""A task name -> a loaded task: a built-in name, a question file, or a `.yaml` task file (igea's or lm-eval's).

The two YAML formats are told apart by their keys: igea's has `path` (the questions' file), lm-eval's has
`dataset_path`, `doc_to_text` and its other `TaskConfig` keys; a file with both, or neither, is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from igea.config import TASK_FILE_SUFFIXES, EvalConfig, check_task_names
from igea.errors import ConfigError
from igea.tasks import lmeval
from igea.tasks.base import MultipleChoiceTask
from igea.tasks.local import LocalTaskSpec, load_local_task, local_task_spec
from igea.tasks.registry import BUILTIN_TASKS, load_builtin_task

IGEA_KEYS = frozenset(LocalTaskSpec.__dataclass_fields__)
SHARED_KEYS = frozenset({"num_fewshot"})  # in both formats: says nothing about which one a file is


def load_task(name: str, num_fewshot: int | None = None, limit: int | None = None) -> MultipleChoiceTask:
    """A built-in task by name (from the hub) or a local one (`.yaml` task file or question file).

    `num_fewshot` (None: the task's own count) and `limit` (the first questions only) decide what is read.
    """
    check_task_names([name], key="task")
    if name in BUILTIN_TASKS:
        return load_builtin_task(name, num_fewshot, limit)
    path = Path(name).expanduser()
    if path.suffix.lower() not in TASK_FILE_SUFFIXES:
        return load_local_task(local_task_spec(path), num_fewshot, limit)
    raw = read_task_file(path)
    if task_file_format(raw, path) == "lm-eval":
        return lmeval.load_lm_eval_task(lmeval.lm_eval_task_spec(path, raw), num_fewshot, limit)
    return load_local_task(local_task_spec(path, raw), num_fewshot, limit)


def load_tasks(
    names: list[str], eval_cfg: EvalConfig | None = None, key: str = "eval.tasks"
) -> list[MultipleChoiceTask]:
    """Every task of `names` loaded as evaluation scores it (the `eval:` section's few-shot count and limit).

    Call it before training: a bad name, task file, column, answer or few-shot count, or a hub task that
    cannot be downloaded, fails at once instead of after the run. `run_tasks` takes the loaded tasks.
    """
    eval_cfg = eval_cfg or EvalConfig()
    check_task_names(names, key)
    return [load_task(name, eval_cfg.num_fewshot, eval_cfg.limit) for name in names]


class _Function(str):
    """A `!function module.name` value of an lm-eval task file: Python code, which igea does not run."""


class _TaskFileLoader(yaml.SafeLoader):
    """YAML's safe loader that also reads lm-eval's `!function` tag (so that its key can be named)."""


_TaskFileLoader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))


def read_task_file(path: Path) -> dict[str, Any]:
    """The mapping in a `.yaml` task file; a `!function` anywhere is a ConfigError naming its key."""
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskFileLoader)  # a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(f"task file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"task file '{path}': must be a mapping of keys, got {type(raw).__name__}")
    for key, value in _walk(raw):
        if isinstance(value, _Function):
            raise ConfigError(f"task file '{path}': {key}: '!function {value}' runs Python code, which igea "
                              "does not; write a Jinja template or a column name instead")
    return raw


def _walk(node: Any, prefix: str = ""):
    """(dotted key, value) of every value in nested mappings and lists."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        dotted = f"{prefix}[{key}]" if isinstance(node, list) else f"{prefix}{'.' if prefix else ''}{key}"
        yield dotted, value
        yield from _walk(value, dotted)


def task_file_format(raw: dict[str, Any], path: Path) -> str:
    """"igea" or "lm-eval": which of the two task file formats `raw` is, by its keys."""
    keys = set(raw) - SHARED_KEYS
    ours, theirs = sorted(keys & IGEA_KEYS), sorted(keys & lmeval.KEYS)
    if ours and theirs:
        raise ConfigError(
            f"task file '{path}': mixes igea task keys ({', '.join(ours)}) with lm-eval task keys "
            f"({', '.join(theirs)}); use one format"
        )
    if theirs:
        return "lm-eval"
    if "path" in ours:
        return "igea"
    raise ConfigError(
        f"task file '{path}': neither an igea task file (it needs 'path', the questions' file) nor an "
        "lm-eval task file (it needs 'dataset_path', 'doc_to_text', 'doc_to_choice', 'doc_to_target' and "
        "'output_type: multiple_choice'); see the README's Evaluation section"
    )
