"""Live tracking: `training.report_to` checked before anything is built, TensorBoard logs kept inside the run,
`training.log_throughput` (tokens/s, and MFU on a GPU) added to every training log, and each log printed as
one line a person can read (`step 20/204  loss 5.123  learning_rate 0.001961 ...`).

The integrations themselves are transformers' own callbacks (TensorBoard, trackio, wandb, MLflow, ...); igea
only makes sure each one's package is there and that what it logs lands in the run directory.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from transformers import PreTrainedModel, PrinterCallback, ProgressCallback, Trainer, TrainerCallback
from transformers.integrations import integration_utils

from igea.config import IgeaConfig
from igea.errors import ConfigError, IgeaError

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


def attach_tracking(trainer: Trainer, cfg: IgeaConfig) -> None:
    """Point TensorBoard at the run directory and add the throughput logs when `training.log_throughput` is on."""
    for callback in trainer.callback_handler.callbacks:
        # The evaluation before training logs before `on_train_begin`, where the callback would pick its
        # directory: without this it would open a writer in ./runs of the current directory instead.
        if isinstance(callback, integration_utils.TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = os.path.join(trainer.args.output_dir, integration_utils.default_logdir())
    for default, readable in ((ProgressCallback, ReadableProgress), (PrinterCallback, LogLines)):
        if any(type(callback) is default for callback in trainer.callback_handler.callbacks):
            trainer.remove_callback(default)
            trainer.add_callback(readable)
    if cfg.training.get("log_throughput"):
        model = trainer.model
        peak = peak_flops(trainer.args.device)
        throughput = ThroughputCallback(cfg.data.block_size, flops_per_token(model, cfg.data.block_size), peak)
        # first, so the reporting integrations (and the progress bar) see what it adds to a log
        trainer.callback_handler.callbacks.insert(0, throughput)


QUIET_LOG_KEYS = ("total_flos", "_runtime", "_per_second", "_model_preparation_time")
"""Kept in log_history and metrics.json, left out of the printed line."""


def log_line(state, logs: dict[str, Any]) -> str:
    """One log as `step 20/204  loss 5.123  grad_norm 1.02 ...`: numbers printed as numbers, 4 significant
    digits."""
    parts = [f"step {state.global_step}/{state.max_steps}" if state.max_steps else f"step {state.global_step}"]
    for key, value in logs.items():
        if key.endswith(QUIET_LOG_KEYS) or key == "step":
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return "  ".join(parts)


class ReadableProgress(ProgressCallback):
    """The Trainer's progress bar (on a terminal), with each log written above it as one readable line."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            if self.training_bar is not None:
                self.training_bar.write(log_line(state, logs))
            else:
                logger.info(log_line(state, logs))


class LogLines(TrainerCallback):
    """Without a progress bar (not a terminal, `disable_tqdm`): each log as one readable log line."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            logger.info(log_line(state, logs))


class ThroughputCallback(TrainerCallback):
    """Adds `tokens_per_second` (and `mfu` when the GPU's peak is known) to each training log.

    Tokens/s is measured over the steps since the previous training log, on wall time with evaluation and
    checkpointing left out; a step holds per-device batch x processes x accumulation blocks of `block_size`
    tokens (igea's blocks are never padded). MFU = tokens/s x FLOPs per token / the GPU's dense bf16 peak.
    """

    def __init__(self, block_size: int, flops_per_token: float, peak_flops: float | None) -> None:
        self.block_size = block_size
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.tokens_per_step = 0
        self.busy = 0.0  # seconds of training since the last report
        self.steps = 0
        self.resumed = self.step_end = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.tokens_per_step = (args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
                                * self.block_size)
        self.busy, self.steps = 0.0, 0
        self.resumed = self.step_end = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_end = time.perf_counter()
        self.steps += 1

    def pause(self) -> None:
        """Evaluation or checkpointing just ended: count training up to the last step, restart the clock now."""
        self.busy += max(0.0, self.step_end - self.resumed)
        self.resumed = time.perf_counter()

    def on_evaluate(self, args, state, control, **kwargs):
        self.pause()

    def on_save(self, args, state, control, **kwargs):
        self.pause()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not self.steps:
            return  # evaluation metrics, or the summary at the end of training
        now = time.perf_counter()  # the Trainer has just read the loss: the device is done with the steps
        self.busy += now - self.resumed
        values = throughput_values(self.steps * self.tokens_per_step, self.busy, self.flops_per_token,
                                   self.peak_flops)
        logs.update(values)
        # the Trainer appended a copy of `logs` to the history just before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
        self.busy, self.steps, self.resumed = 0.0, 0, now


def throughput_values(tokens: int, seconds: float, flops_per_token: float, peak_flops: float | None) -> dict:
    """`tokens_per_second`, and `mfu` when the peak is known."""
    if seconds <= 0:
        return {}
    tokens_per_second = tokens / seconds
    values: dict[str, Any] = {"tokens_per_second": round(tokens_per_second, 1)}
    if peak_flops:
        values["mfu"] = round(tokens_per_second * flops_per_token / peak_flops, 4)
    return values


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
