"""Multiple-choice benchmarks scored by log-likelihood, as lm-evaluation-harness scores them.

One module per job: `base` (questions, few-shot examples, prompt templates, reading rows), `registry` (the
card's built-in hub tasks), `local` (question files and igea `.yaml` task files), `lmeval` (lm-eval task
YAMLs), `load` (a name or file -> a task), `scoring` (log-likelihoods, acc/acc_norm, the card's table).
"""

from igea.config import BUILTIN_TASK_NAMES, check_task_names
from igea.tasks.base import Item, MultipleChoiceTask
from igea.tasks.lmeval import LmEvalTaskSpec, lm_eval_task_spec, load_lm_eval_task
from igea.tasks.load import load_task, load_tasks
from igea.tasks.local import LocalTaskSpec, load_local_task, local_task_spec
from igea.tasks.registry import BUILTIN_TASKS, HubTask
from igea.tasks.scoring import (
    context_length,
    loglikelihoods,
    markdown_table,
    predictions,
    run_tasks,
    score_batch,
    score_task,
)

__all__ = [
    "BUILTIN_TASKS",
    "BUILTIN_TASK_NAMES",
    "HubTask",
    "Item",
    "LmEvalTaskSpec",
    "LocalTaskSpec",
    "MultipleChoiceTask",
    "check_task_names",
    "context_length",
    "lm_eval_task_spec",
    "load_lm_eval_task",
    "load_local_task",
    "load_task",
    "load_tasks",
    "local_task_spec",
    "loglikelihoods",
    "markdown_table",
    "predictions",
    "run_tasks",
    "score_batch",
    "score_task",
]
