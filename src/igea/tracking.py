"""Live tracking: `training.report_to` checked before anything is built, TensorBoard logs kept inside the run,
`training.log_throughput` (tokens/s, and MFU on a GPU) added to every training log, and each log printed as
one line a person can read (`step 20/204  loss 5.123  learning_rate 0.001961 ...`).

The integrations themselves are transformers' own callbacks (TensorBoard, trackio, wandb, MLflow, ...); igea
only makes sure each one's package is there and that what it logs lands in the run directory.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import deque
from typing import Any

import torch
from transformers import PreTrainedModel, PrinterCallback, ProgressCallback, Trainer, TrainerCallback
from transformers.integrations import integration_utils

from igea import progress
from igea.config import IgeaConfig
from igea.errors import ConfigError, IgeaError
from igea.progress import count, duration
from igea.status import StatusFile, evaluation_record

logger = logging.getLogger(__name__)

# report_to name -> (transformers' availability check, what to pip install)
INTEGRATION_PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("is_tensorboard_available", '"igea[tracking]" (or tensorboard)'),
    "trackio": ("is_trackio_available", "trackio"),
    "wandb": ("is_wandb_available", "wandb"),
    "mlflow": ("is_mlflow_available", "mlflow"),
    "comet_ml": ("is_comet_available", "comet-ml"),
    "clearml": ("is_clearml_available", "clearml"),
    "neptune": ("is_neptune_available", "neptune"),
    "dvclive": ("is_dvclive_available", "dvclive"),
    "swanlab": ("is_swanlab_available", "swanlab"),
    "codecarbon": ("is_codecarbon_available", "codecarbon"),
    "azure_ml": ("is_azureml_available", "azureml-sdk"),
    "dagshub": ("is_dagshub_available", "dagshub"),
    "flyte": ("is_flytekit_available", "flytekit"),
    "kubeflow": ("is_kubeflow_available", "kubeflow"),
}

# Dense bf16 peak of each card, from NVIDIA's data sheets (without sparsity); the first name found wins.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def check_report_to(report_to: list[str]) -> None:
    """Every `training.report_to` integration is known and its package installed: else one line, before
    anything is built or written (the Trainer would fail only once the model is loaded)."""
    known = integration_utils.INTEGRATION_TO_CALLBACK
    for name in report_to:
        if name not in known:
            raise ConfigError(f"training.report_to: {name!r} is not an integration; choose from all, none, "
                              f"{', '.join(known)}")
        check, package = INTEGRATION_PACKAGES.get(name, (None, None))
        if check is not None and not getattr(integration_utils, check)():
            raise IgeaError(f"training.report_to: {name} is not installed; pip install {package}")


def attach_tracking(trainer: Trainer, cfg: IgeaConfig, started: float | None = None,
                    status: StatusFile | None = None) -> TrainingClock:
    """Point TensorBoard at the run directory, time the run (`TrainingClock`: speed, elapsed, ETA, and
    `training.log_throughput`'s metrics in every training log) and print each log as one readable line.

    `started` is when the run began (time.time(); default now): the elapsed time counts from it. `status`, on the
    main process, is the run's status file, which the clock keeps up to date (`igea status`).
    """
    for callback in trainer.callback_handler.callbacks:
        # The evaluation before training logs before `on_train_begin`, where the callback would pick its
        # directory: without this it would open a writer in ./runs of the current directory instead.
        if isinstance(callback, integration_utils.TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = os.path.join(trainer.args.output_dir, integration_utils.default_logdir())
    model = trainer.model
    clock = TrainingClock(cfg.data.block_size, flops_per_token(model, cfg.data.block_size),
                          peak_flops(trainer.args.device), started=started, status=status,
                          metrics=cfg.training.get("log_throughput", True))
    # first, so the reporting integrations (and the progress bar) see what it adds to a log
    trainer.callback_handler.callbacks.insert(0, clock)
    for default, readable in ((ProgressCallback, ReadableProgress), (PrinterCallback, LogLines)):
        if any(type(callback) is default for callback in trainer.callback_handler.callbacks):
            trainer.remove_callback(default)
            trainer.add_callback(readable(clock))
    return clock


QUIET_LOG_KEYS = ("total_flos", "_runtime", "_per_second", "_model_preparation_time")
"""Kept in log_history and metrics.json, left out of the printed line."""
SPEED_KEYS = ("tokens_per_second", "mfu", "peak_memory_gib")
"""What the clock adds to a training log: printed in the line's speed part, not among the metrics."""


def log_line(state, logs: dict[str, Any], timing: str = "") -> str:
    """One log as `step 20/204 (9.8%)  loss 5.123  grad_norm 1.02 ... | 0.41 s/step  2.5k tok/s | 8.2 s, ETA
    1m16s`: numbers printed as numbers, 4 significant digits; `timing` (the clock's part) after the metrics."""
    parts = [where(state)]
    for key, value in logs.items():
        if key.endswith(QUIET_LOG_KEYS) or key == "step" or (timing and key in SPEED_KEYS):
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return "  ".join(parts) + (f" | {timing}" if timing else "")


def where(state) -> str:
    """`step 20/204 (9.8%)`, or `step 20` when the run's length is not known."""
    if not state.max_steps:
        return f"step {state.global_step}"
    return f"step {state.global_step}/{state.max_steps} ({state.global_step / state.max_steps:.1%})"


class ReadableProgress(ProgressCallback):
    """The Trainer's progress bar (on a terminal), with each log written above it as one readable line."""

    def __init__(self, clock: TrainingClock) -> None:
        super().__init__()
        self.clock = clock

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            line = log_line(state, logs, self.clock.timing(logs))
            if self.training_bar is not None:  # above the bar, on stderr with it and the other log lines
                self.training_bar.write(line, file=sys.stderr)  # (tqdm's default is stdout: the command's results)
            else:
                logger.info(line)


class LogLines(TrainerCallback):
    """Without a progress bar (a log file, `disable_tqdm`): each log as one readable log line, and between logs,
    a line with the step, the speed, the elapsed time and the ETA at least every PROGRESS_SECONDS."""

    def __init__(self, clock: TrainingClock) -> None:
        self.clock = clock
        self.last_line = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            logger.info(log_line(state, logs, self.clock.timing(logs)))
            self.last_line = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        # after the Trainer's own flow callback: `should_log` says whether this step's log line is coming
        if not state.is_world_process_zero or control.should_log or state.global_step >= state.max_steps:
            return
        if time.monotonic() - self.last_line >= progress.PROGRESS_SECONDS:
            self.clock.measure(state)
            logger.info("%s | %s", where(state), self.clock.timing())
            self.last_line = time.monotonic()


class TrainingClock(TrainerCallback):
    """Times the run as it trains, for every log line, the lines between them and the run's status file.

    Speed is measured over the steps since the previous line, on wall time with evaluation and checkpointing
    left out: seconds per step, tokens/s (a step holds per-device batch x processes x accumulation blocks of
    `block_size` tokens; igea's blocks are never padded), and on a GPU the MFU (tokens/s x FLOPs per token / the
    GPU's dense bf16 peak, when the card is known) and the peak memory. The ETA of the last step is the steps left
    at the speed of the recent steps (the last RECENT_INTERVALS intervals between lines), plus the evaluations and
    checkpoints still to come at the time the last of each took (the evaluation before training counts). With
    `metrics` (`training.log_throughput`, on by default) the speed also goes into each training log
    (log_history, metrics.json and the trackers).
    """

    RECENT_INTERVALS = 10

    def __init__(self, block_size: int, flops_per_token: float, peak_flops: float | None, *,
                 started: float | None = None, status: StatusFile | None = None, metrics: bool = True) -> None:
        self.block_size = block_size
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.started = started if started is not None else time.time()
        self.status = status
        self.metrics = metrics
        self.tokens_per_step = 0
        self.busy = 0.0  # seconds of training since the last measure
        self.steps = 0
        self.resumed = self.step_end = time.perf_counter()
        self.recent: deque[tuple[int, float]] = deque(maxlen=self.RECENT_INTERVALS)
        self.eval_seconds: float | None = None
        self.save_seconds: float | None = None
        self.last: dict[str, float] = {}  # the last measure: seconds_per_step, tokens_per_second, ...
        self.args = None  # the run's TrainingArguments, from on_train_begin
        self.reported = time.monotonic()  # when the status file was last brought up to date

    # -- measuring ---------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self.tokens_per_step = (args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
                                * self.block_size)
        self.busy, self.steps = 0.0, 0
        self.resumed = self.step_end = time.perf_counter()
        self.args = args
        if state.is_world_process_zero:
            self.say_what_the_eta_counts(args, state)
            self.report(state, phase="training")

    def on_step_end(self, args, state, control, **kwargs):
        self.step_end = time.perf_counter()
        self.steps += 1
        self.keep_status_fresh(state)

    def on_prediction_step(self, args, state, control, **kwargs):
        self.keep_status_fresh(state)  # a long evaluation is not a hung run either

    def keep_status_fresh(self, state) -> None:
        """Between log lines (thousands of steps apart, or a long evaluation), bring the status file up to date at
        least every PROGRESS_SECONDS, whether the log is a file or a terminal: `igea status` then shows the step
        and ETA of now, and a run is told from a hung one."""
        if self.status is None or time.monotonic() - self.reported < progress.PROGRESS_SECONDS:
            return
        fields: dict[str, Any] = {}
        current = None  # the steps since the last measure, left open: the next log line measures them
        busy = self.busy + max(0.0, self.step_end - self.resumed)
        if self.steps and busy > 0:
            current = (self.steps, busy)
            fields.update(seconds_per_step=busy / self.steps,
                          tokens_per_second=round(self.steps * self.tokens_per_step / busy, 1))
        eta = self.eta(state, current)
        if eta is not None:
            fields["eta"] = eta
        self.report(state, **fields)

    def pause(self) -> float:
        """Evaluation or checkpointing just ended: count training up to the last step, restart the clock now;
        return how long the pause took."""
        now = time.perf_counter()
        paused = now - max(self.step_end, self.resumed)
        self.busy += max(0.0, self.step_end - self.resumed)
        self.resumed = now
        return paused

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        seconds = (metrics or {}).get("eval_runtime")
        paused = self.pause()
        self.eval_seconds = seconds if seconds is not None else paused
        if state.is_world_process_zero and metrics:
            self.report(state, phase="training", evaluation=evaluation_record(state.global_step, metrics))

    def on_save(self, args, state, control, **kwargs):
        self.save_seconds = self.pause()
        if state.is_world_process_zero:
            self.report(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not self.steps:
            return  # evaluation metrics, or the summary at the end of training
        # the Trainer has just read the loss: the device is done with the steps
        values = self.measure(state)
        if self.metrics:
            logs.update(values)
            # the Trainer appended a copy of `logs` to the history just before calling the callbacks
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(values)
        if state.is_world_process_zero:
            self.report(state, loss={"step": state.global_step, "value": logs["loss"]})

    def measure(self, state) -> dict[str, float]:
        """Close the interval since the last measure: its speed becomes the clock's `last`; returns the metrics
        a training log gets (tokens/s, and MFU and peak memory on a GPU)."""
        now = time.perf_counter()
        self.busy += now - self.resumed
        steps, busy = self.steps, self.busy
        self.busy, self.steps, self.resumed = 0.0, 0, now
        if not steps or busy <= 0:
            return {}
        self.recent.append((steps, busy))
        values = throughput_values(steps * self.tokens_per_step, busy, self.flops_per_token, self.peak_flops)
        memory = peak_memory_gib()
        if memory is not None:
            values["peak_memory_gib"] = memory
        self.last = {"seconds_per_step": busy / steps, **values}
        self.last["eta"] = self.eta(state)
        return values

    def eta(self, state, current: tuple[int, float] | None = None) -> float | None:
        """Seconds until the last step: the steps left at the recent speed (with the `current` interval's steps and
        seconds, not yet measured, when given), plus the evaluations and saves left at their last measured time."""
        intervals = [*self.recent, *([current] if current else [])]
        if not state.max_steps or not intervals:
            return None
        per_step = sum(seconds for _, seconds in intervals) / sum(steps for steps, _ in intervals)
        evaluations, saves = events_left(self.args, state)
        return ((state.max_steps - state.global_step) * per_step + evaluations * (self.eval_seconds or 0.0)
                + saves * (self.save_seconds or 0.0))

    # -- saying it ---------------------------------------------------------------------------------------

    def timing(self, logs: dict[str, Any] | None = None) -> str:
        """The speed and time part of a line: `0.41 s/step  2.5k tok/s  MFU 47%  61.2 GiB | 8.2 s, ETA 1m16s`;
        only the time for a log that is not a training one."""
        elapsed = duration(time.time() - self.started)
        if logs is not None and "loss" not in logs:
            return elapsed
        last = self.last
        speed = []
        if "seconds_per_step" in last:
            speed.append(f"{last['seconds_per_step']:.3g} s/step")
        if "tokens_per_second" in last:
            speed.append(f"{count(last['tokens_per_second'])} tok/s")
        if "mfu" in last:
            speed.append(f"MFU {last['mfu']:.0%}")
        if "peak_memory_gib" in last:
            speed.append(f"{last['peak_memory_gib']:.1f} GiB")
        eta = last.get("eta")
        when = f"{elapsed}, ETA {duration(eta)}" if eta is not None else elapsed
        return "  ".join(speed) + f" | {when}" if speed else when

    def say_what_the_eta_counts(self, args, state) -> None:
        """Once, as training starts: what the ETA on each line counts."""
        evaluations, saves = events_left(args, state)
        parts = ["the steps left at the speed of the recent ones"]
        if evaluations:
            cost = (f"{duration(self.eval_seconds)} each, as the evaluation before training took"
                    if self.eval_seconds is not None else "at the time the first one takes")
            parts.append(f"{evaluations} evaluation(s) left ({cost})")
        if saves:
            parts.append(f"{saves} checkpoint save(s) left (at the time the first one takes)")
        logger.info("each line's ETA counts %s", ", ".join(parts))

    def report(self, state, **fields: Any) -> None:
        """Bring the status file up to date (main process)."""
        if self.status is None:
            return
        self.reported = time.monotonic()
        last = self.last
        record = {"step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch,
                  "elapsed": time.time() - self.started, "eta": last.get("eta"),
                  "seconds_per_step": last.get("seconds_per_step"), "tokens_per_second": last.get("tokens_per_second")}
        self.status.update(**{**record, **fields})


def events_left(args, state) -> tuple[int, int]:
    """Evaluations and checkpoint saves still to come, as the Trainer schedules them (every `eval_steps` /
    `save_steps`, and at the last step): those of the current step count, as a step's log comes before them."""
    step, last = state.global_step, state.max_steps

    def left(strategy: str, every: float | None) -> int:
        if strategy != "steps" or not every or not last:
            return 0
        every = math.ceil(every * last) if every < 1 else int(every)
        return last // every - max(step - 1, 0) // every + (last % every != 0)

    return (left(str(getattr(args.eval_strategy, "value", args.eval_strategy)), args.eval_steps),
            left(str(getattr(args.save_strategy, "value", args.save_strategy)), args.save_steps))


def throughput_values(tokens: int, seconds: float, flops_per_token: float, peak_flops: float | None) -> dict:
    """`tokens_per_second`, and `mfu` when the peak is known."""
    if seconds <= 0:
        return {}
    tokens_per_second = tokens / seconds
    values: dict[str, Any] = {"tokens_per_second": round(tokens_per_second, 1)}
    if peak_flops:
        values["mfu"] = round(tokens_per_second * flops_per_token / peak_flops, 4)
    return values


def peak_memory_gib() -> float | None:
    """The most GPU memory this process has held for tensors so far, in GiB (None without CUDA)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def flops_per_token(model: PreTrainedModel, block_size: int) -> float:
    """Training FLOPs per token: 6 N_trained + 4 N_frozen + 12 L H T.

    N counts the weights that multiply (every parameter but the input embedding's, unless it is tied to the
    LM head): forward 2 per weight, backward 2 for the activations' gradient and 2 more for the weight's own,
    which a frozen weight (LoRA's base) skips. 12 L H T is attention's scores and weighted values over a block
    of T tokens, forward and backward, with L layers of hidden size H (PaLM's accounting, causal mask ignored).
    For full training this is the usual 6 N + 12 L H T.
    """
    tied = getattr(model.config, "tie_word_embeddings", False)
    skip = set() if tied else {id(p) for p in model.get_input_embeddings().parameters()}
    trained = frozen = 0
    for name, param in model.named_parameters():
        if id(param) in skip or "original_module" in name:  # peft keeps an unused copy of modules_to_save
            continue
        if param.requires_grad:
            trained += param.numel()
        else:
            frozen += param.numel()
    config = model.config
    attention = 12 * getattr(config, "num_hidden_layers", 0) * getattr(config, "hidden_size", 0) * block_size
    return 6 * trained + 4 * frozen + attention


def peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak FLOP/s of the CUDA device trained on, when it is a card igea knows; else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)
    if peak is None:
        logger.info("log_throughput: no MFU, the peak FLOP/s of %s is not known to igea", name)
    return peak
