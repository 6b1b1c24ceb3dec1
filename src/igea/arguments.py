"""The `training:` section as `transformers.TrainingArguments`: igea's keys translated, the batch layout across
processes (`total_train_batch_size`), the evaluation and saving cadence settled once the run's length is known,
and the checks that a launch gave the processes it asked for."""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from igea.config import CADENCE_FLOOR_STEPS, RELATIVE_CADENCE, IgeaConfig, held_out_set_names
from igea.errors import ConfigError, IgeaError

logger = logging.getLogger(__name__)


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


def planned_blocks(args: TrainingArguments, train_blocks: int) -> int:
    """Blocks the run will train on: max_steps global batches, or num_train_epochs passes over the blocks."""
    if args.max_steps > 0:
        return args.max_steps * args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    return round(args.num_train_epochs * train_blocks)


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
