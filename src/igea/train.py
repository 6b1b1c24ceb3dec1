"""Continued pretraining with the Hugging Face Trainer: the card's recipe, from one config, top to bottom.

`train` opens the run directory (checked and locked: `open_run`), then `train_started` does the run: tokenizer,
corpus and held-out sets, model (and adapters), igea's Trainer (`igea.trainer`) with the arguments the config
gives (`igea.arguments`), the evaluation before training, training (or resuming), the evaluation after it, and
the final weights and metrics. `igea.run` adds samples, benchmarks and the model card.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from transformers import Trainer, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME

from igea.arguments import (
    batch_layout,
    check_launch,
    check_process_group,
    log_layout,
    planned_blocks,
    settle_cadence,
    training_arguments,
)
from igea.basemodel import base_model_path, load_tokenizer
from igea.config import IgeaConfig
from igea.data import PreparedData, mixture_used, prepare_dataset, report_mixture_plan, report_mixture_weights
from igea.errors import IgeaError
from igea.lora import apply_lora, check_peft, save_adapter
from igea.modeling import load_causal_lm
from igea.preemption import CheckpointOnStop, Preempted, stop_on_signals
from igea.preflight import check_before_training, check_block_size
from igea.progress import heard_by, progress_bars_off_in_logs
from igea.rundir import (
    BEFORE_METRICS,
    RUN_MARKER,
    check_output_dir,
    check_resume,
    read_json,
    share_like_other_files,
    write_json_atomic,
)
from igea.runstart import RunLock, RunStart, plan_run, start_record
from igea.status import StatusFile
from igea.streaming import BlockStream
from igea.tracking import check_report_to
from igea.trainer import ResumedCadence, build_trainer

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished run left in `output_dir`, and its metrics."""

    output_dir: Path
    metrics: dict[str, Any]
    log_history: list[dict[str, Any]] = field(default_factory=list)
    layout: dict[str, Any] = field(default_factory=dict)


def train(cfg: IgeaConfig, resume: bool | Literal["auto"] = False, overwrite: bool = False,
          allow_config_change: bool = False) -> RunResult:
    """Continue pretraining the base model on the corpus; save weights, tokenizer and metrics in `output_dir`.

    `resume=True` continues the run in `output_dir` from its newest verified checkpoint (from the beginning when
    it saved none yet); a directory that holds no run is an error (a typo in the path must not start a new run).
    `resume="auto"` continues the run when there is one and starts it when there is none: for a scheduler that
    requeues the same command. A resumed run refuses a config that differs from the one the run was started
    with, unless `allow_config_change`; `overwrite` replaces a finished run (igea's files only).
    """
    with open_run(cfg, resume, overwrite, allow_config_change) as start:
        return train_started(cfg, start, finish=True)


@contextmanager
def open_run(cfg: IgeaConfig, resume: bool | str, overwrite: bool,
             allow_config_change: bool) -> Iterator[RunStart]:
    """Check the output directory and lock it for this run (main process), then hand every process the same
    `RunStart`. Nothing is written before the checks pass; the lock is released when the block ends, however it
    ends, and a run that fails before it began training leaves a new directory as it found it.
    """
    with progress_bars_off_in_logs(), _open_run(cfg, resume, overwrite, allow_config_change) as start:
        yield start


@contextmanager
def _open_run(cfg: IgeaConfig, resume: bool | str, overwrite: bool,
              allow_config_change: bool) -> Iterator[RunStart]:
    check_resume(resume)
    check_launch()
    if cfg.model.tiny is None:
        check_block_size(cfg)  # reads only the model's config: an unreachable hub id fails in seconds
    args = training_arguments(cfg)  # before anything is written: a bad recipe fails in a second
    check_process_group(args)
    check_report_to(args.report_to)  # tracking: each integration's package is installed
    if cfg.peft is not None:
        check_peft(cfg)  # lora: peft is installed, the adapter's modules exist
    log_layout(args)
    state = PartialState()
    with ExitStack() as lock:
        start = None
        with main_process_first():  # a refusal of the main process ends every process with its one line
            if state.is_main_process:
                check_output_dir(cfg.output_dir, resume=resume, overwrite=overwrite)
                lock.enter_context(RunLock(cfg.output_dir))
                start = plan_run(cfg.to_dict(), cfg.output_dir, resume, overwrite, allow_config_change)
        if state.num_processes > 1:
            start = broadcast_object_list([start])[0]
        if state.is_main_process:
            start.status = StatusFile(cfg.output_dir)
            start.status.update(phase="starting: reading the corpus and loading the model")
            lock.enter_context(heard_by(start.status.heard))  # long work's progress keeps `igea status` fresh
        try:
            yield start
        except BaseException as err:
            if state.is_main_process:
                start.abandon()
            full = isinstance(err, Exception) and disk_full(err, cfg.output_dir)
            message = (f"no space left on the device of {cfg.output_dir} ({first_line(err)}); free some space, "
                       "then continue with --resume") if full else first_line(err)
            if start.status is not None:  # what `igea status` says of this run from now on
                stopped = isinstance(err, (KeyboardInterrupt, Preempted))
                start.status.ended("interrupted" if stopped else "failed",
                                   error="stopped by Ctrl-C" if isinstance(err, KeyboardInterrupt) else message)
            if full:
                raise IgeaError(message) from err
            raise


@contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block first (it builds what every process needs), then the others do.

    Unlike accelerate's own, a user error of the main process reaches the others, so every process ends with
    the same one-line error instead of a lost connection.
    """
    state = PartialState()
    if state.num_processes == 1:
        yield
        return
    if state.is_main_process:
        try:
            yield
        except IgeaError as err:
            broadcast_object_list([err])
            raise
        broadcast_object_list([None])
        return
    [failure] = broadcast_object_list([None])
    if failure is not None:
        raise failure
    yield


def disk_full(err: Exception, path: Path) -> bool:
    """Was `err` caused by a full disk? torch.save reports it only as a failed write, so the free space of
    `path` is asked too."""
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(err):
        return True
    if isinstance(err, RuntimeError) and "inline_container" in str(err):
        try:
            return shutil.disk_usage(path).free < 64 * 2**20
        except OSError:
            return False
    return False


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def train_started(cfg: IgeaConfig, start: RunStart, finish: bool) -> RunResult:
    """The training itself, in a directory `open_run` prepared; `finish` writes the finished-run marker."""
    args = training_arguments(cfg)
    with main_process_first():  # one process builds the tiny model and the packed blocks, the others read
        tokenizer = load_tokenizer(cfg)  # builds the tiny model first when the config asks for one
        benchmarks = check_before_training(cfg, tokenizer)
        data = prepare_dataset(cfg, tokenizer)  # before the weights: a corpus problem shows up in seconds
    if PartialState().num_processes > 1 and "cache" in data.stats:  # the record shows who tokenized
        data.stats["cache_by_rank"] = gather_object([data.stats["cache"]])
    model = load_causal_lm(base_model_path(cfg), cfg.model)
    if cfg.peft is not None:
        model = apply_lora(model, cfg)  # lora: only the adapters (and peft.modules_to_save) train
    if cfg.data.packing == "documents":
        model.config.use_cache = False  # with a cache, restarting position_ids do not mask across documents
    metrics: dict[str, Any] = {"data": data.stats}
    trainer = build_trainer(cfg, args, model, tokenizer, data, benchmarks if cfg.eval.during_training else (),
                            started=start.opened, status=start.status)
    settle_cadence(trainer, cfg)
    if trainer.is_world_process_zero():
        report_mixture(cfg, data, trainer.args, warn=start.checkpoint is None)  # warned once, as the run starts
        built_for_this_run = (["base-model"] if cfg.model.tiny is not None else []) + (
            ["base-model-extended"] if cfg.model.extend_vocabulary is not None else [])
        start.begin(framework_versions(), keep=tuple(built_for_this_run))
    trainer.accelerator.wait_for_everyone()
    if data.validation_sets and cfg.eval.before_training:
        metrics["before"] = evaluate_before(trainer, cfg)
    checkpoint = start.checkpoint
    if checkpoint is not None:
        trainer.restore_totals(checkpoint)
        if isinstance(data.train, BlockStream) and data.train.restore(checkpoint):
            trainer.args.ignore_data_skip = True  # the stream continues from its saved position: nothing to replay
    if checkpoint is not None and training_finished_in(trainer, checkpoint):
        metrics["train"] = restore_finished_training(trainer, checkpoint)
    else:
        with stop_on_signals() as stop:
            trainer.add_callback(CheckpointOnStop(stop, trainer.accelerator))
            if checkpoint is not None:
                trainer.add_callback(ResumedCadence(checkpoint))
            train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if stop.signum is not None and trainer.state.global_step < trainer.state.max_steps:
            raise Preempted(
                f"stopped by {stop.name} at step {trainer.state.global_step} of {trainer.state.max_steps}; "
                f"checkpoint-{trainer.state.global_step} is saved: continue with --resume "
                "(Python: resume=True)", stop.signum)
        metrics["train"] = train_output.metrics
    metrics["data"]["blocks_trained"] = trainer.blocks_trained()
    if trainer.sources:
        metrics["data"]["tokens_seen"] = trainer.tokens_seen_per_source()
        used = metrics["data"]["mixture"] = mixture_used(data.stats["train"], metrics["data"]["tokens_seen"],
                                                         cfg.data.block_size)
        logger.info("trained per source: %s", "; ".join(
            f"{name} {u['used']:,} blocks" + (f" of {u['blocks']:,} ({u['passes']:.2f} passes)" if u["blocks"] else "")
            for name, u in used.items()))
    if data.validation_sets:
        metrics["after"] = final_evaluation(trainer)
    if args.load_best_model_at_end and trainer.state.best_model_checkpoint:
        metrics["best"] = best_checkpoint(trainer)
    if start.status is not None:
        start.status.update(phase="saving the final weights", eta=None)
    result = save_run(trainer, cfg, metrics, start)
    if finish and trainer.is_world_process_zero():
        mark_finished(cfg, result, start)
    return result


def report_mixture(cfg: IgeaConfig, data: PreparedData, args: TrainingArguments, warn: bool = True) -> None:
    """What a mixture of `data.sources` gives the run (`igea train` and `igea prepare` print the same lines): the
    weights as the shares they are, and, for blocks prepared on disk, each source's blocks, those the run trains on
    and the passes that makes, with a warning (`warn`) for a source mostly left out or repeated more than 4 times."""
    if len(cfg.data.sources) < 2:
        return
    report_mixture_weights(cfg.data.sources)
    if not cfg.data.streaming:
        report_mixture_plan(data.stats["train"], planned_blocks(args, len(data.train)),
                            args.max_steps if args.max_steps > 0 else None, warn)


def training_finished_in(trainer: Trainer, checkpoint: Path) -> bool:
    """True when `checkpoint` is the last step of the run (the run was stopped while saving its results)."""
    state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
    max_steps = trainer.args.max_steps
    if max_steps <= 0:
        max_steps = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]
    return state.global_step >= max_steps


def restore_finished_training(trainer: Trainer, checkpoint: Path) -> dict[str, Any]:
    """Load the final weights and state of a run whose training had ended; train nothing more."""
    logger.info("%s is the last step of the run: nothing left to train, saving its results", checkpoint.name)
    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best and Path(best).is_dir():
        trainer._load_from_checkpoint(best)  # what the Trainer does at the end of training
    summary = {"global_step": trainer.state.global_step, "epoch": trainer.state.epoch,
               "total_flos": trainer.state.total_flos}
    if trainer.resumed_loss is not None and trainer.state.global_step:
        summary["train_loss"] = (trainer.loss_before + trainer.resumed_loss[0]) / trainer.state.global_step
    return summary


def evaluate_before(trainer: Trainer, cfg: IgeaConfig) -> dict[str, float]:
    """Metrics of the base model, computed once and kept in the run dir so that a resumed run reuses them,
    as long as the model and the data settings are those they were computed with."""
    path = cfg.output_dir / BEFORE_METRICS
    inputs = {"model": cfg.to_dict()["model"], "data": cfg.to_dict()["data"]}
    if cfg.eval.during_training:  # the benchmarks are scored with the held-out sets
        inputs["eval"] = cfg.to_dict()["eval"]
    saved = read_json(path) if path.is_file() else {}
    if saved.get("inputs") == json.loads(json.dumps(inputs, default=str)):
        return saved["metrics"]
    metrics = evaluate_trainer(trainer)
    # accelerate marks a model prepared for evaluation as prepared for good, and `train()` would then skip
    # the DDP wrapper: every rank would train its own copy (accelerate 1.15, transformers 5.24)
    trainer.model.__dict__.pop("_is_accelerate_prepared", None)
    if trainer.is_world_process_zero():
        write_json_atomic(path, {"inputs": inputs, "metrics": metrics})
    return metrics


def final_evaluation(trainer: Trainer) -> dict[str, float]:
    """Held-out metrics of the final weights: those logged by the evaluation of the same weights when there was
    one (at the last step, or at the best one when `load_best_model_at_end` restored it), else a new evaluation."""
    state = trainer.state
    step = state.best_global_step if trainer.args.load_best_model_at_end and state.best_model_checkpoint \
        else state.global_step
    evals = [entry for entry in state.log_history if "eval_loss" in entry and entry.get("step") == step]
    if evals:
        return {k: v for k, v in evals[-1].items() if k.startswith("eval_") or k == "epoch"}
    return evaluate_trainer(trainer)


def evaluate_trainer(trainer: Trainer) -> dict[str, float]:
    """Held-out loss, perplexity and next-token accuracy of the trainer's current model (each set and in all)."""
    return trainer.evaluate()


def best_checkpoint(trainer: Trainer) -> dict[str, Any]:
    """Which checkpoint `load_best_model_at_end` made the final weights, and why (for the run record and card)."""
    state, args = trainer.state, trainer.args
    metric = args.metric_for_best_model if args.metric_for_best_model.startswith("eval_") \
        else f"eval_{args.metric_for_best_model}"
    logger.info("the final weights are those of %s (step %d): the %s %s of the run, %.4f", Path(
        state.best_model_checkpoint).name, state.best_global_step, "highest" if args.greater_is_better else "lowest",
        metric, state.best_metric)
    return {"checkpoint": Path(state.best_model_checkpoint).name, "step": state.best_global_step, "metric": metric,
            "value": state.best_metric, "greater_is_better": bool(args.greater_is_better),
            "last_step": state.global_step}


# ----------------------------------------------------------------------------------------------------------
# Final outputs


def save_run(trainer: Trainer, cfg: IgeaConfig, metrics: dict[str, Any], start: RunStart) -> RunResult:
    """Final weights (safetensors), tokenizer, metrics.json and log_history.json; the run is not yet marked
    finished (`mark_finished` does that, last).

    The model is saved into a staging directory and each file renamed into place, so no reader (nor a crash)
    ever sees a half-written weight file.
    """
    out = cfg.output_dir
    staging = out / ".final.tmp"
    if trainer.is_world_process_zero() and staging.exists():
        shutil.rmtree(staging)  # left by a run stopped while saving
    trainer.accelerator.wait_for_everyone()
    if cfg.peft is not None:  # lora: the adapter, the merged weights, and what was trained (for the card)
        metrics["adapter"] = save_adapter(trainer, cfg.peft, staging)
    else:
        trainer.save_model(str(staging))
    result = RunResult(out, metrics, trainer.state.log_history, batch_layout(trainer.args))
    if not trainer.is_world_process_zero():
        return result
    share_like_other_files(staging)
    for item in staging.iterdir():
        target = out / item.name
        if item.is_dir() and target.is_dir():
            shutil.rmtree(target)  # a folder (adapter/) moved in by a run stopped while saving
        os.replace(item, target)
    staging.rmdir()
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / "log_history.json", trainer.state.log_history)
    return result


def mark_finished(cfg: IgeaConfig, result: RunResult, start: RunStart) -> None:
    """Write `igea_run.json`, the marker of a finished run: config, versions, layout, metrics, and each resume
    (with the settings it changed, and the config the run started with when any did); the status says so."""
    started = start_record(cfg.output_dir)
    resumes = started.get("resumes", [])
    write_json_atomic(cfg.output_dir / RUN_MARKER, {
        "config": cfg.to_dict(), "versions": framework_versions(), "layout": result.layout,
        "metrics": result.metrics, "started": started.get("started"), "resumes": resumes,
        "started_with": started.get("config") if any(r.get("changes") for r in resumes) else None,
    })
    if start.status is not None:  # once the marker is there: a run whose marker failed is not called finished
        start.status.ended("finished")


def framework_versions() -> dict[str, str]:
    import datasets
    import tokenizers
    import transformers

    import igea

    return {"igea": igea.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "datasets": datasets.__version__, "tokenizers": tokenizers.__version__}


