"""igea's Trainer: the transformers Trainer plus what continued pretraining needs from it (see `IgeaTrainer`),
and `build_trainer`, which makes one over the packed blocks as `igea train` does."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, speed_metrics

from igea.config import HELD_OUT_METRICS, TASK_METRICS, EvalConfig, IgeaConfig, source_name, task_metric_key
from igea.data import BlockCollator, PreparedData
from igea.errors import IgeaError
from igea.metrics import NextTokenMetrics, argmax_and_nll, combined, perplexity
from igea.progress import Progress, duration, human_size
from igea.rundir import CHECKPOINT_MARKER, mark_checkpoint_complete, rotate_checkpoints, share_like_other_files
from igea.status import StatusFile
from igea.streaming import BlockStream
from igea.tasks import MultipleChoiceTask, run_tasks
from igea.tracking import TrainingClock, attach_tracking

logger = logging.getLogger(__name__)


PHASE_KEYS = ("num_decay_steps", "num_stable_steps")
"""`lr_scheduler_kwargs` of warmup_stable_decay that may be a share of the run's steps (a number below 1)."""


class IgeaTrainer(Trainer):
    """The transformers Trainer, plus what continued pretraining needs from it:

    - a NaN/inf loss stops the run before it reaches a checkpoint;
    - every checkpoint gets a completion marker with its files' sizes and checksums once all of it is on disk
      (resume verifies it and skips the others); old checkpoints are rotated out only after that;
    - the blocks trained on are counted, and with mixed corpora the tokens each source supplied (both kept across
      a resume); so is the training loss summed by the Trainer, logged or not yet: after a resume, the first
      logged loss and `train_loss` are those of the uninterrupted run (the mean over all the run's steps);
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
        self.blocks = 0  # blocks this process trained on (with the run's earlier sessions' on the main process)
        self.loss_before: float | None = 0.0  # the logged training loss summed before this session (None: unknown)
        self.resumed_loss: tuple[float, int] | None = None  # a checkpoint's loss not yet logged, and its last log
        self.benchmarks = list(benchmarks)
        self.eval_config = eval_config or EvalConfig()
        self.clock: TrainingClock | None = None  # set by build_trainer: times the run, keeps its status file
        self.eval_progress: Progress | None = None  # counts an evaluation's batches while it runs

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        source = inputs.pop("source", None)
        self.blocks += inputs["input_ids"].shape[0]
        if self.resumed_loss is not None:  # the first step after a resume: the Trainer has just zeroed its sums
            pending, self._globalstep_last_logged = self.resumed_loss
            self._tr_loss += pending
            self.resumed_loss = None
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

    def blocks_trained(self) -> int:
        """Blocks trained on so far in the run, summed over processes (a collective: every rank calls it)."""
        return int(self.accelerator.reduce(torch.tensor(self.blocks, device=self.accelerator.device), reduction="sum"))

    def loss_state(self) -> dict[str, float | int] | None:
        """The training loss the Trainer has summed so far in the run, as it sums it for the logs and `train_loss`:
        what it logged, what it has not logged yet (each averaged over processes) and the step of its last log;
        a collective. None when a resumed checkpoint did not record it."""
        if self.loss_before is None:
            return None
        pending = self.accelerator.reduce(self._tr_loss.detach().clone(), reduction="mean").item()
        return {"logged_sum": self.loss_before + self._total_loss_scalar, "pending": pending,
                "last_logged_step": self._globalstep_last_logged}

    def _finalize_training(self, trial, num_train_samples, start_time):
        # transformers 5 averages `train_loss` over the steps of this `train()` call only: after a resume, over the
        # steps since the checkpoint. The run's own is the mean over all its steps, as an uninterrupted run reports.
        steps = self.state.global_step - self._initial_global_step
        if self._initial_global_step and steps > 0 and self.loss_before is not None:
            total = self.loss_before + self._total_loss_scalar + self._tr_loss.item()
            self._tr_loss.zero_()
            self._total_loss_scalar = total / self.state.global_step * steps  # what the Trainer divides by `steps`
        return super()._finalize_training(trial, num_train_samples, start_time)

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
        self.eval_progress = self.announce_evaluation(named)
        try:
            for name, dataset in named.items():
                prefix = f"{metric_key_prefix}_{name}" if name else metric_key_prefix
                # by name, the Trainer keeps one data loader per set when its workers persist
                loader = self.get_eval_dataloader(name if name and eval_dataset is None else dataset)
                output = self.evaluation_loop(loader, description=f"Evaluation {name}".strip(),
                                              ignore_keys=ignore_keys, metric_key_prefix=prefix)
                per_set.update(output.metrics)
                samples += output.num_samples
        finally:
            self.eval_progress = None
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
        if self.is_world_process_zero():
            logger.info("evaluated in %s", duration(time.time() - started))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics

    def announce_evaluation(self, named: dict[str, Dataset]) -> Progress | None:
        """Say which held-out sets an evaluation is about to read (main process), and return what counts its
        batches: lines with percent and ETA in a log file (a terminal has the Trainer's bar)."""
        if not self.is_world_process_zero():
            return None
        per_batch = self.args.eval_batch_size * self.args.world_size
        sizes = {name: len(d) if hasattr(d, "__len__") else None for name, d in named.items()}
        listed = ", ".join(f"{name} {size:,} blocks" if name else f"{size:,} blocks"
                           for name, size in sizes.items() if size is not None)
        when = (f"at step {self.state.global_step}" if self.state.global_step or self.state.max_steps
                else "the model before training")
        logger.info("evaluating %s: %s%s", when, listed,
                    f" (and {len(self.benchmarks)} benchmark(s))" if self.benchmarks else "")
        if self.clock is not None:
            self.clock.report(self.state, phase=f"evaluating {when}")
        total = sum(math.ceil(size / per_batch) for size in sizes.values() if size is not None)
        return Progress(f"evaluating {when}", total, "batches", logger=logger, bar=False, say_done=False,
                        every=None if self.args.disable_tqdm else math.inf)

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
        if self.eval_progress is not None:
            self.eval_progress.update()
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
        started = time.monotonic()
        if self.is_world_process_zero():
            (folder / CHECKPOINT_MARKER).unlink(missing_ok=True)  # a folder saved again is incomplete until marked
            logger.info("saving %s", folder.name)
            if self.clock is not None:
                self.clock.report(self.state, phase=f"saving {folder.name}")
        super()._save_checkpoint(model, trial)  # the Trainer rotates nothing (igea holds save_total_limit)
        self.accelerator.wait_for_everyone()  # every rank has written its part (RNG states, shards)
        totals = {"tokens_seen": self.tokens_seen_per_source(), "blocks_trained": self.blocks_trained(),
                  "loss": self.loss_state()}  # collectives: every rank takes part
        if self.is_world_process_zero():
            if isinstance(self.train_dataset, BlockStream):  # where the stream is, so that --resume need not replay it
                self.train_dataset.save(folder, self.state.global_step * self.get_total_train_batch_size(self.args))
            share_like_other_files(folder)
            mark_checkpoint_complete(folder, {"global_step": self.state.global_step, **totals})
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            logger.info("saved %s (%s, %s)", folder.name, human_size(size), duration(time.monotonic() - started))
            best = self.state.best_model_checkpoint
            rotate_checkpoints(run_dir, self.save_total_limit, protect=(Path(best),) if best else ())
        self.accelerator.wait_for_everyone()

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # A tied model's checkpoint holds the shared embedding once, under one name: the other name (lm_head.weight)
        # is reported missing although it was loaded with it. Only keys that are really missing are reported.
        missing = set(load_result.missing_keys) - loaded_through_a_tie(self.model, load_result.missing_keys)
        super()._issue_warnings_after_load(
            load_result._replace(missing_keys=[k for k in load_result.missing_keys if k in missing]))

    def restore_totals(self, checkpoint: Path) -> None:
        """Carry a checkpoint's running totals into a resumed run: the training loss summed so far (logged and not
        yet logged), and the blocks and per-source tokens trained on (counts held by the main process). A
        checkpoint of an older igea lacks the loss (the run's `train_loss` then covers the resumed steps only) and
        the block count (it restarts at 0)."""
        saved = json.loads((checkpoint / CHECKPOINT_MARKER).read_text(encoding="utf-8"))
        loss = saved.get("loss")
        self.loss_before = loss["logged_sum"] if loss else None
        self.resumed_loss = (loss["pending"], loss["last_logged_step"]) if loss else None
        if self.is_world_process_zero():
            self.blocks = saved.get("blocks_trained") or 0
            seen = saved.get("tokens_seen") or {}
            if self.sources:
                self.source_tokens = torch.tensor([seen.get(name, 0) for name in self.sources], dtype=torch.long)


class NonFiniteLossError(IgeaError):
    """The training loss became NaN or inf."""


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
                  benchmarks: Sequence[MultipleChoiceTask] = (), started: float | None = None,
                  status: StatusFile | None = None) -> Trainer:
    """igea's Trainer over the packed blocks, with next-token accuracy as its metric, every held-out set evaluated
    on its own, and `benchmarks` scored at every evaluation. Its clock counts the elapsed time from `started`
    (time.time(); default now) and keeps `status` (the run's status file, main process) up to date."""
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
    # tracking: TensorBoard logs in the run dir; speed, elapsed time and ETA on every line
    trainer.clock = attach_tracking(trainer, cfg, started=started, status=status)
    return trainer


def totals(metrics: dict[str, float], sets: list[str], prefix: str = "eval") -> dict[str, float]:
    """The token-weighted loss and accuracy, and the tokens, of several held-out sets together, from each set's
    own metrics (`eval_<set>_loss`, ...)."""
    total = combined([{m: metrics[f"{prefix}_{name}_{m}"] for m in ("loss", "accuracy", "tokens")} for name in sets])
    return {f"{prefix}_{key}": value for key, value in total.items()}
