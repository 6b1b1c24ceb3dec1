"""Continued pretraining with the Hugging Face Trainer: the card's recipe, from one config."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, speed_metrics

from igea.basemodel import base_model_path, load_tokenizer
from igea.config import (
    CADENCE_FLOOR_STEPS,
    HELD_OUT_METRICS,
    RELATIVE_CADENCE,
    TASK_METRICS,
    EvalConfig,
    IgeaConfig,
    held_out_set_names,
    source_name,
    task_metric_key,
)
from igea.data import BlockCollator, PreparedData, mixture_used, prepare_dataset, report_mixture_plan
from igea.errors import ConfigError, IgeaError
from igea.lora import apply_lora, check_peft, save_adapter
from igea.metrics import NextTokenMetrics, argmax_and_nll, combined, perplexity
from igea.modeling import load_causal_lm
from igea.preemption import CheckpointOnStop, Preempted, stop_on_signals
from igea.preflight import check_before_training, check_block_size
from igea.rundir import (
    BEFORE_METRICS,
    CHECKPOINT_MARKER,
    RUN_MARKER,
    check_output_dir,
    mark_checkpoint_complete,
    read_json,
    rotate_checkpoints,
    write_json_atomic,
)
from igea.runstart import RunLock, RunStart, plan_run, start_record
from igea.streaming import BlockStream
from igea.tasks import MultipleChoiceTask, run_tasks
from igea.tracking import attach_tracking, check_report_to

logger = logging.getLogger(__name__)



@dataclass
class RunResult:
    """What a finished run left in `output_dir`, and its metrics."""

    output_dir: Path
    metrics: dict[str, Any]
    log_history: list[dict[str, Any]] = field(default_factory=list)
    layout: dict[str, Any] = field(default_factory=dict)


def train(cfg: IgeaConfig, resume: bool = False, overwrite: bool = False,
          allow_config_change: bool = False) -> RunResult:
    """Continue pretraining the base model on the corpus; save weights, tokenizer and metrics in `output_dir`.

    `resume` continues from the newest verified checkpoint and refuses a config that differs from the one the
    run was started with, unless `allow_config_change`; `overwrite` replaces a finished run (igea's files only).
    """
    with open_run(cfg, resume, overwrite, allow_config_change) as start:
        return train_started(cfg, start, finish=True)


@contextmanager
def open_run(cfg: IgeaConfig, resume: bool, overwrite: bool, allow_config_change: bool) -> Iterator[RunStart]:
    """Check the output directory and lock it for this run (main process), then hand every process the same
    `RunStart`. Nothing is written before the checks pass; the lock is released when the block ends, however it
    ends, and a run that fails before it began training leaves a new directory as it found it.
    """
    with progress_bars_off_in_logs(), _open_run(cfg, resume, overwrite, allow_config_change) as start:
        yield start


@contextmanager
def _open_run(cfg: IgeaConfig, resume: bool, overwrite: bool, allow_config_change: bool) -> Iterator[RunStart]:
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
        try:
            yield start
        except BaseException as err:
            if state.is_main_process:
                start.abandon()
            if isinstance(err, Exception) and disk_full(err, cfg.output_dir):
                raise IgeaError(f"no space left on the device of {cfg.output_dir} ({first_line(err)}); free some "
                                "space, then continue with --resume") from err
            raise


@contextmanager
def progress_bars_off_in_logs() -> Iterator[None]:
    """When stderr is not a terminal (a log file, a pipe), the progress bars of datasets (tokenizing),
    transformers (loading and writing weights) and the hub are off while the block runs, as the CLI has them:
    in a log each would be a line per redraw. A bar an environment variable forces on stays on; each switch is
    put back as it was afterwards (this is a library: the caller's settings are its own)."""
    if sys.stderr.isatty():
        yield
        return
    import datasets
    from datasets import utils as datasets_bars
    from huggingface_hub import constants
    from huggingface_hub import utils as hub_bars
    from transformers.utils import logging as transformers_logging

    restore = []
    forced_on = datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is False  # HF_DATASETS_DISABLE_PROGRESS_BARS=0
    if not forced_on and not datasets_bars.are_progress_bars_disabled():
        datasets_bars.disable_progress_bars()
        restore.append(datasets_bars.enable_progress_bars)
    if constants.HF_HUB_DISABLE_PROGRESS_BARS is not False and transformers_logging.is_progress_bar_enabled():
        hub_was_off = hub_bars.are_progress_bars_disabled()
        transformers_logging.disable_progress_bar()  # transformers' bars, and the hub's with them
        restore.append(hub_bars.disable_progress_bars if hub_was_off else lambda: None)
        restore.append(transformers_logging.enable_progress_bar)
    try:
        yield
    finally:
        for switch_back in reversed(restore):
            switch_back()


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
    trainer = build_trainer(cfg, args, model, tokenizer, data, benchmarks if cfg.eval.during_training else ())
    settle_cadence(trainer, cfg)
    if trainer.is_world_process_zero() and not cfg.data.streaming:
        report_mixture_plan(data.stats["train"], planned_blocks(args, len(data.train)))
    if trainer.is_world_process_zero():
        built_for_this_run = (["base-model"] if cfg.model.tiny is not None else []) + (
            ["base-model-extended"] if cfg.model.extend_vocabulary is not None else [])
        start.begin(framework_versions(), keep=tuple(built_for_this_run))
    trainer.accelerator.wait_for_everyone()
    if data.validation_sets and cfg.eval.before_training:
        metrics["before"] = evaluate_before(trainer, cfg)
    checkpoint = start.checkpoint
    if checkpoint is not None:
        trainer.restore_tokens_seen(checkpoint)
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
    result = save_run(trainer, cfg, metrics, start)
    if finish and trainer.is_world_process_zero():
        mark_finished(cfg, result)
    return result


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
    return {"global_step": trainer.state.global_step, "epoch": trainer.state.epoch,
            "total_flos": trainer.state.total_flos}


PHASE_KEYS = ("num_decay_steps", "num_stable_steps")
"""`lr_scheduler_kwargs` of warmup_stable_decay that may be a share of the run's steps (a number below 1)."""


class IgeaTrainer(Trainer):
    """The transformers Trainer, plus what continued pretraining needs from it:

    - a NaN/inf loss stops the run before it reaches a checkpoint;
    - every checkpoint gets a completion marker with its files' sizes and checksums once all of it is on disk
      (resume verifies it and skips the others); old checkpoints are rotated out only after that;
    - with mixed corpora, the tokens each source supplied are counted (and kept across a resume);
    - a streamed corpus saves its position with every checkpoint (so a resume does not replay the stream);
    - the eval loss is token-weighted, exact however the blocks were batched or spread over processes, and
      costs one cross-entropy per batch (the model is not asked for its own loss);
    - each held-out set is evaluated on its own, with the totals over all of them, in one log entry; the
      benchmarks of `eval.tasks` too, when they are scored during training.
    """

    def __init__(self, *args: Any, stop_on_nonfinite_loss: bool = True, sources: list[str] | None = None,
                 save_total_limit: int | None = None, benchmarks: Sequence[MultipleChoiceTask] = (),
                 eval_config: EvalConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_on_nonfinite_loss = stop_on_nonfinite_loss
        self.save_total_limit = save_total_limit  # applied by igea after the completion marker, not by the Trainer
        self.sources = sources or []
        self.source_tokens = torch.zeros(len(self.sources), dtype=torch.long)
        self.benchmarks = list(benchmarks)
        self.eval_config = eval_config or EvalConfig()

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        source = inputs.pop("source", None)
        if source is not None:
            blocks = torch.bincount(source.cpu(), minlength=len(self.sources))
            self.source_tokens += blocks * inputs["input_ids"].shape[1]
        loss = super().training_step(model, inputs, num_items_in_batch)
        # the Trainer itself reads the loss every step (logging_nan_inf_filter), so this adds no device sync
        if self.stop_on_nonfinite_loss and not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at step {self.state.global_step + 1}; the last good checkpoint "
                "is kept (lower training.learning_rate or check the data, then --resume)"
            )
        return loss

    def tokens_seen_per_source(self) -> dict[str, int]:
        """Training tokens each mixed source supplied so far, summed over processes."""
        if not self.sources:
            return {}
        total = self.accelerator.reduce(self.source_tokens.to(self.accelerator.device), reduction="sum")
        return {name: int(n) for name, n in zip(self.sources, total.tolist(), strict=True)}

    def evaluate(self, eval_dataset: Dataset | dict[str, Dataset] | None = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Evaluate every held-out set and log the results once.

        Each named set gives `eval_<set>_loss`, `_accuracy`, `_perplexity` and `_tokens`; `eval_loss`,
        `eval_accuracy` and `eval_tokens` are the token-weighted totals over all sets (with one set, its own
        values), so `metric_for_best_model: eval_loss` means the same whatever the number of sets. The Trainer's
        own `evaluate` would log each set as a separate entry, with no total.
        """
        sets = eval_dataset if eval_dataset is not None else self.eval_dataset
        named = sets if isinstance(sets, dict) else {"": sets}
        self._memory_tracker.start()
        started = time.time()
        per_set: dict[str, float] = {}
        samples = 0
        for name, dataset in named.items():
            prefix = f"{metric_key_prefix}_{name}" if name else metric_key_prefix
            # by name, the Trainer keeps one data loader per set when its workers persist
            loader = self.get_eval_dataloader(name if name and eval_dataset is None else dataset)
            output = self.evaluation_loop(loader, description=f"Evaluation {name}".strip(), ignore_keys=ignore_keys,
                                          metric_key_prefix=prefix)
            per_set.update(output.metrics)
            samples += output.num_samples
        groups = [metric_key_prefix] + [f"{metric_key_prefix}_{name}" for name in named if name]
        if len(named) > 1:
            per_set.update(totals(per_set, [name for name in named if name], metric_key_prefix))
        per_set.update({f"{prefix}_perplexity": perplexity(per_set[f"{prefix}_loss"]) for prefix in groups})
        order = [f"{prefix}_{metric}" for prefix in groups for metric in (*HELD_OUT_METRICS, "tokens")]
        metrics = {key: per_set.pop(key) for key in order if key in per_set}  # the totals first, then each set
        metrics.update(per_set)
        if self.benchmarks:
            metrics.update(self.score_benchmarks(metric_key_prefix))
        batches = math.ceil(samples / (self.args.eval_batch_size * self.args.world_size))
        metrics.update(speed_metrics(metric_key_prefix, started, num_samples=samples, num_steps=batches))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics

    def score_benchmarks(self, prefix: str = "eval") -> dict[str, float]:
        """acc and acc_norm of the current weights on each benchmark of `eval.tasks` (`eval_<task>_acc`, ...).

        Every process scores them (all take part in a sharded model's forward passes) and gets the same numbers.
        """
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        scores = run_tasks(model, self.processing_class, self.benchmarks, self.eval_config)
        model.train(was_training)
        return {task_metric_key(name, metric).replace("eval_", f"{prefix}_", 1): score[metric]
                for name, score in scores.items() for metric in TASK_METRICS}

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # warmup_stable_decay's phases may be given as shares of the run, as transformers 5 takes `warmup_steps`
        kwargs = self.args.lr_scheduler_kwargs
        if isinstance(kwargs, dict) and any(isinstance(kwargs.get(k), float) for k in PHASE_KEYS):
            self.args.lr_scheduler_kwargs = {key: round(value * num_training_steps) if key in PHASE_KEYS
                                             and isinstance(value, float) and value < 1 else value
                                             for key, value in kwargs.items()}
        return super().create_scheduler(num_training_steps, optimizer)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # The model is not given the labels: its own loss would be a second pass over the vocabulary, beside
        # the NLL `argmax_and_nll` computes for the exact token-weighted loss (issue 19).
        if prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("labels")
        with torch.no_grad(), self.compute_loss_context_manager():
            logits = model(**inputs, use_cache=False).logits
        return None, logits, labels

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        # The Trainer's own eval loss averages per-batch means, which drifts when the last batch is padded
        # with repeated blocks to spread it over processes; the token-weighted sum is exact.
        output = super().evaluation_loop(*args, **kwargs)
        for key in [k for k in output.metrics if k.endswith("_token_loss")]:
            name, loss = key.removesuffix("_token_loss") + "_loss", output.metrics.pop(key)
            rest = {k: v for k, v in output.metrics.items() if k != name}
            output.metrics.clear()  # the loss first, as the Trainer logs its own
            output.metrics.update({name: loss, **rest})
        return output

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.is_world_process_zero():
            (folder / CHECKPOINT_MARKER).unlink(missing_ok=True)  # a folder saved again is incomplete until marked
        super()._save_checkpoint(model, trial)  # the Trainer rotates nothing (igea holds save_total_limit)
        self.accelerator.wait_for_everyone()  # every rank has written its part (RNG states, shards)
        seen = self.tokens_seen_per_source()  # a collective: every rank takes part
        if self.is_world_process_zero():
            if isinstance(self.train_dataset, BlockStream):  # where the stream is, so that --resume need not replay it
                self.train_dataset.save(folder, self.state.global_step * self.get_total_train_batch_size(self.args))
            mark_checkpoint_complete(folder, {"global_step": self.state.global_step, "tokens_seen": seen})
            best = self.state.best_model_checkpoint
            rotate_checkpoints(run_dir, self.save_total_limit, protect=(Path(best),) if best else ())
        self.accelerator.wait_for_everyone()

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # A tied model's checkpoint holds the shared embedding once, under one name: the other name (lm_head.weight)
        # is reported missing although it was loaded with it. Only keys that are really missing are reported.
        missing = set(load_result.missing_keys) - loaded_through_a_tie(self.model, load_result.missing_keys)
        super()._issue_warnings_after_load(
            load_result._replace(missing_keys=[k for k in load_result.missing_keys if k in missing]))

    def restore_tokens_seen(self, checkpoint: Path) -> None:
        """Carry the per-source token counts of a checkpoint into a resumed run (held by the main process)."""
        seen = json.loads((checkpoint / CHECKPOINT_MARKER).read_text(encoding="utf-8")).get("tokens_seen") or {}
        if self.sources and self.is_world_process_zero():
            self.source_tokens = torch.tensor([seen.get(name, 0) for name in self.sources], dtype=torch.long)


def loaded_through_a_tie(model: torch.nn.Module, missing: list[str]) -> set[str]:
    """The `missing` parameter names that share their tensor with a parameter that was loaded (tied weights)."""
    names = defaultdict(set)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names[id(parameter)].add(name)
    missing_set = set(missing)
    return {name for shared in names.values() if len(shared) > 1 and shared - missing_set
            for name in shared & missing_set}


class ResumedCadence(TrainerCallback):
    """On a resumed run: says how long loading the checkpoint's state took (weights, optimizer, scheduler), and
    makes the run follow the logging, evaluation and saving cadence of its config (transformers keeps the
    checkpoint's, while igea lets a resume change it: RESUME_SAFE_KEYS)."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.started = time.perf_counter()
        if PartialState().is_main_process:
            logger.info("loading %s: weights, optimizer and scheduler states", checkpoint.name)

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)
        if state.is_world_process_zero:
            logger.info("%s loaded in %.1f s; training continues at step %d of %d", self.checkpoint.name,
                        time.perf_counter() - self.started, state.global_step, state.max_steps)


def build_trainer(cfg: IgeaConfig, args: TrainingArguments, model, tokenizer, data: PreparedData,
                  benchmarks: Sequence[MultipleChoiceTask] = ()) -> Trainer:
    """igea's Trainer over the packed blocks, with next-token accuracy as its metric, every held-out set evaluated
    on its own, and `benchmarks` scored at every evaluation."""
    sets = data.validation_sets
    trainer = IgeaTrainer(
        stop_on_nonfinite_loss=cfg.training.get("stop_on_nonfinite_loss", True),
        save_total_limit=cfg.training.get("save_total_limit"),
        sources=[source_name(s) for s in cfg.data.sources] if len(cfg.data.sources) > 1 else None,
        benchmarks=benchmarks,
        eval_config=cfg.eval,
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=(dict(sets) if len(sets) > 1 else next(iter(sets.values()))) if sets else None,
        data_collator=BlockCollator(),
        processing_class=tokenizer,
        compute_metrics=NextTokenMetrics(),
        preprocess_logits_for_metrics=argmax_and_nll,
    )
    attach_tracking(trainer, cfg)  # tracking: TensorBoard logs in the run dir, training.log_throughput
    return trainer


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


def totals(metrics: dict[str, float], sets: list[str], prefix: str = "eval") -> dict[str, float]:
    """The token-weighted loss and accuracy, and the tokens, of several held-out sets together, from each set's
    own metrics (`eval_<set>_loss`, ...)."""
    total = combined([{m: metrics[f"{prefix}_{name}_{m}"] for m in ("loss", "accuracy", "tokens")} for name in sets])
    return {f"{prefix}_{key}": value for key, value in total.items()}


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
# Training arguments


def training_arguments(cfg: IgeaConfig) -> TrainingArguments:
    """TrainingArguments from the `training:` section, with igea's own keys translated.

    `warmup_ratio` becomes transformers 5's fractional `warmup_steps`; `total_train_batch_size` sets the
    gradient accumulation for the current world size. DDP does not search for unused parameters unless
    `ddp_find_unused_parameters: true` (models with weights a forward pass may skip, such as mixtures of experts).
    """
    section = dict(cfg.training)
    ratio = section.pop("warmup_ratio", None)
    if ratio is not None:
        section["warmup_steps"] = float(ratio)
    total = section.pop("total_train_batch_size", None)
    section.pop("stop_on_nonfinite_loss", None)
    section.pop("save_total_limit", None)  # igea rotates checkpoints itself, after marking the new one complete
    section.pop("log_throughput", None)
    if total is not None:
        section["gradient_accumulation_steps"] = accumulation_for(total, section, world_size())
    if cfg.data.token_budget is not None:
        section["max_steps"] = steps_for_budget(cfg.data.token_budget, cfg.data.block_size, section)
    if not has_validation(cfg):
        section["eval_strategy"] = "no"
    metric = section.get("metric_for_best_model")
    if metric is not None and section.get("greater_is_better") is None:  # transformers guesses from "loss" alone
        section["greater_is_better"] = not metric.endswith(("loss", "perplexity"))
    section.update(cadence_placeholders(cfg.training))
    if "disable_tqdm" not in section and not sys.stderr.isatty():
        section["disable_tqdm"] = True  # in a log file a progress bar is a redraw per step: log lines instead
    section.setdefault("batch_eval_metrics", True)
    section.setdefault("remove_unused_columns", False)  # the collator picks its columns (and counts `source`)
    section.setdefault("save_only_model", False)
    # DDP would otherwise look for unused parameters after every backward (an extra autograd traversal, and a
    # warning from each rank): every trainable weight of a dense model or of its LoRA adapters is used
    section.setdefault("ddp_find_unused_parameters", False)
    try:
        return TrainingArguments(**section)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"training: {str(err).strip().splitlines()[0]}") from None


def planned_blocks(args: TrainingArguments, train_blocks: int) -> int:
    """Blocks the run will train on: max_steps global batches, or num_train_epochs passes over the blocks."""
    if args.max_steps > 0:
        return args.max_steps * args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    return round(args.num_train_epochs * train_blocks)


# ----------------------------------------------------------------------------------------------------------
# Cadence: how often a run evaluates and saves


FORWARD_COST = 1 / 3
"""A block evaluated (a forward pass) costs about a third of a block trained on (forward and backward)."""
EVAL_SHARE_WARNING = 0.25
"""Above this estimated share of a run spent evaluating, the run says so as it starts."""


def cadence_placeholders(training: dict[str, Any]) -> dict[str, Any]:
    """`eval_steps` / `save_steps` for the TrainingArguments built before the run's length is known, for those
    the config leaves out: RELATIVE_CADENCE's fractions, made whole steps later by `settle_cadence`. With
    `load_best_model_at_end`, a value the config sets stands in for the other (transformers wants every save on an
    evaluation)."""
    unset = [key for key in RELATIVE_CADENCE if key not in training]
    values: dict[str, Any] = {key: RELATIVE_CADENCE[key] for key in unset}
    if training.get("load_best_model_at_end") and len(unset) == 1:
        given = training["save_steps" if unset == ["eval_steps"] else "eval_steps"]
        if given is not None:
            values[unset[0]] = given
    return values


def relative_cadence(training: dict[str, Any], max_steps: int) -> dict[str, int]:
    """Whole `eval_steps` / `save_steps` for those the config leaves to igea, in a run of `max_steps` steps:
    RELATIVE_CADENCE of the run, but at least CADENCE_FLOOR_STEPS (a 10-step run evaluates and saves once, at
    its end). With `load_best_model_at_end`, saves fall on evaluations."""

    def whole(value: float) -> int:  # a value of the config: a count, or a fraction of the run
        return int(value) if value >= 1 else max(1, math.ceil(value * max_steps))

    def relative(key: str) -> int:
        return max(CADENCE_FLOOR_STEPS, math.ceil(RELATIVE_CADENCE[key] * max_steps))

    best = bool(training.get("load_best_model_at_end"))
    settled: dict[str, int] = {}
    if "eval_steps" not in training:
        given = training.get("save_steps")
        settled["eval_steps"] = whole(given) if best and given is not None else relative("eval_steps")
    if "save_steps" not in training:
        save = relative("save_steps")
        every = settled.get("eval_steps") or (whole(training["eval_steps"]) if training.get("eval_steps") else None)
        settled["save_steps"] = math.ceil(save / every) * every if best and every else save
    return settled


def settle_cadence(trainer: Trainer, cfg: IgeaConfig) -> None:
    """Once the run's length is known: the cadence the config leaves to igea becomes whole steps (said in one
    line), and a run whose held-out evaluations would take more than EVAL_SHARE_WARNING of it says so."""
    args = trainer.args
    if args.max_steps > 0:
        max_steps = args.max_steps
    else:
        max_steps = trainer.set_initial_training_values(args, trainer.get_train_dataloader())[-1]
    settled = relative_cadence(cfg.training, max_steps)
    for key, value in settled.items():
        setattr(args, key, value)
    for key in ("logging_steps", "eval_steps", "save_steps"):  # as TrainerState does: a resume then compares equal
        value = getattr(args, key)
        if value is not None and 0 < value < 1:
            setattr(args, key, math.ceil(value * max_steps))
    if not trainer.is_world_process_zero():
        return
    said = {}
    if "eval_steps" in settled and args.eval_strategy == "steps":
        said["evaluating"] = when(settled["eval_steps"], max_steps)
    if "save_steps" in settled and args.save_strategy == "steps":
        said["saving"] = when(settled["save_steps"], max_steps)
    if said:
        what = (f"evaluating and saving {said['saving']}" if len(set(said.values())) == 1 < len(said)
                else " and ".join(f"{verb} {cadence}" for verb, cadence in said.items()))
        logger.info("%s in %d steps (igea's default: every tenth of the run, at least %d steps apart; "
                    "training.eval_steps and training.save_steps choose)", what, max_steps, CADENCE_FLOOR_STEPS)
    warn_if_evaluation_dominates(trainer, cfg, max_steps)


def when(every: int, max_steps: int) -> str:
    return f"every {every} steps" if every < max_steps else "at the last step only"


def warn_if_evaluation_dominates(trainer: Trainer, cfg: IgeaConfig, max_steps: int) -> None:
    """Estimate the share of the run spent on held-out evaluation (evaluations x validation blocks, each a
    forward pass of about FORWARD_COST of a training block, against steps x blocks per step); say it when it is
    above EVAL_SHARE_WARNING."""
    sets = trainer.eval_dataset if isinstance(trainer.eval_dataset, dict) else {"": trainer.eval_dataset}
    if any(s is None or not hasattr(s, "__len__") for s in sets.values()):
        return
    blocks = sum(len(s) for s in sets.values())  # every held-out set, each evaluated on its own
    args = trainer.args
    if args.eval_strategy == "steps":
        every = args.eval_steps if args.eval_steps >= 1 else math.ceil(args.eval_steps * max_steps)
        evaluations = max_steps // every + (max_steps % every > 0)
    elif args.eval_strategy == "epoch":
        evaluations = math.ceil(args.num_train_epochs) if args.max_steps <= 0 else 1
    else:
        evaluations = 1  # the one after training
    evaluations += int(cfg.eval.before_training)
    blocks_per_step = batch_layout(args)["total_train_batch_size"]
    share = evaluation_share(evaluations, blocks, max_steps, blocks_per_step)
    if share > EVAL_SHARE_WARNING:
        logger.warning(
            "held-out evaluation will take about %.0f%% of this run: %d evaluations x %d validation blocks (a forward "
            "pass each, about %.2g of a training block) against %d steps x %d blocks; raise training.eval_steps or "
            "hold out fewer blocks (data.validation_split)", 100 * share, evaluations, blocks, FORWARD_COST,
            max_steps, blocks_per_step)


def evaluation_share(evaluations: int, eval_blocks: int, steps: int, blocks_per_step: int) -> float:
    """Estimated share of a run's compute spent on held-out evaluation (see `warn_if_evaluation_dominates`)."""
    evaluating = evaluations * eval_blocks * FORWARD_COST
    return evaluating / (evaluating + steps * blocks_per_step)


def has_validation(cfg: IgeaConfig) -> bool:
    return bool(held_out_set_names(cfg.data))


def world_size() -> int:
    """Number of training processes, as torchrun / accelerate launch announce it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_launch() -> None:
    """Refuse a launch that asked for several processes but started one.

    `accelerate launch --cpu --num_processes 2` runs a single process (world size 1) and says nothing; it
    still exports MASTER_ADDR, which a real single-process launch does not.
    """
    if "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        raise IgeaError(
            "the launcher asked for several processes but started one (world size 1): "
            "on CPU use `accelerate launch --multi_gpu --num_processes N` with training.use_cpu: true, "
            "or `torchrun --nproc_per_node N` with training.ddp_backend: gloo"
        )
    sharded = [name for name, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
               if os.environ.get(flag, "false").lower() == "true"]
    if sharded and not torch.cuda.is_available():
        raise IgeaError(
            f"the accelerate config asks for {sharded[0]}, which accelerate runs only on GPUs: on this machine it "
            "would silently train plain data-parallel copies with nothing sharded; on CPU use "
            "configs/accelerate/cpu-2proc.yaml"
        )


def check_process_group(args: TrainingArguments) -> None:
    """Refuse processes that were launched together but did not join one group: each would train alone and
    they would write over each other's run directory (on a CPU machine without `use_cpu` or a gloo backend)."""
    launched = world_size()
    if launched > 1 and args.world_size != launched:
        raise IgeaError(
            f"the launcher started {launched} processes but they did not join one process group (each would "
            "train alone); on CPU set training.use_cpu: true or training.ddp_backend: gloo"
        )


def log_layout(args: TrainingArguments) -> None:
    """Say how the global batch is made, once, on the main process."""
    if args.process_index == 0:
        layout = batch_layout(args)
        logger.info(
            "batch layout: %d per device x %d process(es) x %d accumulation step(s) = %d sequences per step",
            layout["per_device_train_batch_size"], layout["num_devices"], layout["gradient_accumulation_steps"],
            layout["total_train_batch_size"],
        )


def accumulation_for(total: int, section: dict[str, Any], processes: int) -> int:
    """Gradient accumulation steps that make per-device batch x processes x steps equal `total`."""
    per_device = section.get("per_device_train_batch_size", 8)
    per_step = per_device * processes
    if total % per_step:
        raise ConfigError(
            f"training.total_train_batch_size: {total} is not divisible by per_device_train_batch_size "
            f"({per_device}) x processes ({processes}) = {per_step}"
        )
    return total // per_step


def steps_for_budget(tokens: int, block_size: int, section: dict[str, Any]) -> int:
    """Optimizer steps that train on (at least) `tokens` tokens with this batch layout."""
    per_step = (block_size * section.get("per_device_train_batch_size", 8) * world_size()
                * section.get("gradient_accumulation_steps", 1))
    return max(1, math.ceil(tokens / per_step))


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
    for item in staging.iterdir():
        target = out / item.name
        if item.is_dir() and target.is_dir():
            shutil.rmtree(target)  # a folder (adapter/) moved in by a run stopped while saving
        os.replace(item, target)
    staging.rmdir()
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / "log_history.json", trainer.state.log_history)
    return result


def mark_finished(cfg: IgeaConfig, result: RunResult) -> None:
    """Write `igea_run.json`, the marker of a finished run: config, versions, layout, metrics, and each resume
    (with the settings it changed, and the config the run started with when any did)."""
    started = start_record(cfg.output_dir)
    resumes = started.get("resumes", [])
    write_json_atomic(cfg.output_dir / RUN_MARKER, {
        "config": cfg.to_dict(), "versions": framework_versions(), "layout": result.layout,
        "metrics": result.metrics, "started": started.get("started"), "resumes": resumes,
        "started_with": started.get("config") if any(r.get("changes") for r in resumes) else None,
    })


def batch_layout(args: TrainingArguments) -> dict[str, Any]:
    """How the batch is spread: devices, per-device batch, accumulation and the global batch (saved in a run)."""
    return {
        "distributed_type": str(args.parallel_mode.value) if hasattr(args.parallel_mode, "value") else "",
        "num_devices": args.world_size,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "per_device_eval_batch_size": args.per_device_eval_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "total_train_batch_size": args.per_device_train_batch_size * args.world_size
        * args.gradient_accumulation_steps,
        "total_eval_batch_size": args.per_device_eval_batch_size * args.world_size,
    }


def framework_versions() -> dict[str, str]:
    import datasets
    import tokenizers
    import transformers

    import igea

    return {"igea": igea.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "datasets": datasets.__version__, "tokenizers": tokenizers.__version__}


class NonFiniteLossError(IgeaError):
    """The training loss became NaN or inf."""
