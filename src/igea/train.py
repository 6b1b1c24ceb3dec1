"""Continued pretraining with the Hugging Face Trainer: the card's recipe, from one config."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from igea.config import IgeaConfig
from igea.data import PreparedData, prepare_dataset, source_label
from igea.errors import ConfigError, IgeaError
from igea.metrics import IGNORE_INDEX, NextTokenMetrics, argmax_and_nll, perplexity
from igea.modeling import base_model_path, load_causal_lm, load_tokenizer, model_context_length
from igea.rundir import (
    BEFORE_METRICS,
    CHECKPOINT_MARKER,
    RUN_MARKER,
    check_output_dir,
    last_complete_checkpoint,
    write_json_atomic,
)
from igea.streaming import BlockStream

logger = logging.getLogger(__name__)



@dataclass
class RunResult:
    """What a finished run left in `output_dir`, and its metrics."""

    output_dir: Path
    metrics: dict[str, Any]
    log_history: list[dict[str, Any]] = field(default_factory=list)


class BlockCollator:
    """Stack equal-length blocks into a batch; labels are the inputs (the model shifts them).

    Blocks packed by document carry `position_ids`; the first token of each document is then not a target,
    so no token is predicted from another document.
    """

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids = torch.tensor([e["input_ids"] for e in examples], dtype=torch.long)
        batch = {"input_ids": input_ids, "labels": input_ids.clone()}
        if "position_ids" in examples[0]:
            position_ids = torch.tensor([e["position_ids"] for e in examples], dtype=torch.long)
            batch["position_ids"] = position_ids
            batch["labels"][position_ids == 0] = IGNORE_INDEX
        if "source" in examples[0]:  # mixed corpora: which source each block came from (counted, not modelled)
            batch["source"] = torch.tensor([e["source"] for e in examples], dtype=torch.long)
        return batch


def train(cfg: IgeaConfig, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Continue pretraining the base model on the corpus; save weights, tokenizer and metrics in `output_dir`."""
    output_dir = cfg.output_dir
    check_launch()
    if cfg.model.tiny is None:
        check_block_size(cfg)  # reads only the model's config: an unreachable hub id fails in seconds
    args = training_arguments(cfg)  # before anything heavy or destructive: a bad recipe fails in a second
    log_layout(args)
    check_output_dir(output_dir, resume=resume, overwrite=overwrite)
    tokenizer = load_tokenizer(cfg)  # builds the tiny model first when the config asks for one
    if cfg.model.tiny is not None:
        check_block_size(cfg)
    data = prepare_dataset(cfg, tokenizer)  # before the weights: a corpus problem shows up in seconds
    model = load_causal_lm(base_model_path(cfg), cfg.model)
    if cfg.data.packing == "documents":
        model.config.use_cache = False  # with a cache, restarting position_ids do not mask across documents
    metrics: dict[str, Any] = {"data": data.stats}
    if not resume:  # a run started afresh never reuses the base-model metrics of an abandoned one
        (output_dir / BEFORE_METRICS).unlink(missing_ok=True)
    trainer = build_trainer(cfg, args, model, tokenizer, data)
    if data.validation is not None and cfg.eval.before_training:
        metrics["before"] = evaluate_before(trainer, output_dir)
    checkpoint = last_complete_checkpoint(output_dir) if resume else None
    if resume and checkpoint is None:
        logger.warning("--resume: no complete checkpoint in %s, starting from the beginning", output_dir)
    elif checkpoint is not None:
        logger.info("resuming from %s", checkpoint)
        trainer.restore_tokens_seen(checkpoint)
        if isinstance(data.train, BlockStream) and data.train.restore(checkpoint):
            trainer.args.ignore_data_skip = True  # the stream continues from its saved position: nothing to replay
    train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    metrics["train"] = train_output.metrics
    if trainer.sources:
        metrics["data"]["tokens_seen"] = trainer.tokens_seen_per_source()
        logger.info("training tokens per source: %s", metrics["data"]["tokens_seen"])
    if data.validation is not None:
        metrics["after"] = evaluate_trainer(trainer)
    save_run(trainer, cfg, metrics)
    return RunResult(output_dir, metrics, trainer.state.log_history)


class IgeaTrainer(Trainer):
    """The transformers Trainer, plus what continued pretraining needs from it:

    - a NaN/inf loss stops the run before it reaches a checkpoint;
    - every checkpoint gets a completion marker once all of it is on disk (resume skips the others);
    - with mixed corpora, the tokens each source supplied are counted (and kept across a resume);
    - a streamed corpus saves its position with every checkpoint (so a resume does not replay the stream);
    - the eval loss is token-weighted, exact however the blocks were batched or spread over processes.
    """

    def __init__(self, *args: Any, stop_on_nonfinite_loss: bool = True, sources: list[str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_on_nonfinite_loss = stop_on_nonfinite_loss
        self.sources = sources or []
        self.source_tokens = torch.zeros(len(self.sources), dtype=torch.long)

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

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        # The Trainer's own eval loss averages per-batch means, which drifts when the last batch is padded
        # with repeated blocks to spread it over processes; the token-weighted sum is exact.
        output = super().evaluation_loop(*args, **kwargs)
        for key in [k for k in output.metrics if k.endswith("_token_loss")]:
            output.metrics[key.removesuffix("_token_loss") + "_loss"] = output.metrics.pop(key)
        return output

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every rank has written its part (RNG states, shards)
        seen = self.tokens_seen_per_source()  # a collective: every rank takes part
        if self.is_world_process_zero():
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            if isinstance(self.train_dataset, BlockStream):  # where the stream is, so that --resume need not replay it
                self.train_dataset.save(folder, self.state.global_step * self.get_total_train_batch_size(self.args))
            write_json_atomic(folder / CHECKPOINT_MARKER, {"global_step": self.state.global_step, "tokens_seen": seen})

    def restore_tokens_seen(self, checkpoint: Path) -> None:
        """Carry the per-source token counts of a checkpoint into a resumed run (held by the main process)."""
        seen = json.loads((checkpoint / CHECKPOINT_MARKER).read_text(encoding="utf-8")).get("tokens_seen") or {}
        if self.sources and self.is_world_process_zero():
            self.source_tokens = torch.tensor([seen.get(name, 0) for name in self.sources], dtype=torch.long)


def build_trainer(cfg: IgeaConfig, args: TrainingArguments, model, tokenizer, data: PreparedData) -> Trainer:
    """igea's Trainer over the packed blocks, with next-token accuracy as its metric."""
    return IgeaTrainer(
        stop_on_nonfinite_loss=cfg.training.get("stop_on_nonfinite_loss", True),
        sources=[source_label(s) for s in cfg.data.sources] if len(cfg.data.sources) > 1 else None,
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=BlockCollator(),
        processing_class=tokenizer,
        compute_metrics=NextTokenMetrics(),
        preprocess_logits_for_metrics=argmax_and_nll,
    )


def evaluate_before(trainer: Trainer, output_dir: Path) -> dict[str, float]:
    """Metrics of the base model, computed once and kept in the run dir so that a resumed run reuses them."""
    path = output_dir / BEFORE_METRICS
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    metrics = evaluate_trainer(trainer)
    # accelerate marks a model prepared for evaluation as prepared for good, and `train()` would then skip
    # the DDP wrapper: every rank would train its own copy (accelerate 1.15, transformers 5.24)
    trainer.model.__dict__.pop("_is_accelerate_prepared", None)
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, metrics)
    return metrics


def evaluate_trainer(trainer: Trainer) -> dict[str, float]:
    """Held-out loss, perplexity and next-token accuracy of the trainer's current model."""
    metrics = trainer.evaluate()
    metrics["eval_perplexity"] = perplexity(metrics["eval_loss"])
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Training arguments


def training_arguments(cfg: IgeaConfig) -> TrainingArguments:
    """TrainingArguments from the `training:` section, with igea's own keys translated.

    `warmup_ratio` becomes transformers 5's fractional `warmup_steps`; `total_train_batch_size` sets the
    gradient accumulation for the current world size.
    """
    section = dict(cfg.training)
    ratio = section.pop("warmup_ratio", None)
    if ratio is not None:
        section["warmup_steps"] = float(ratio)
    total = section.pop("total_train_batch_size", None)
    section.pop("stop_on_nonfinite_loss", None)
    if total is not None:
        section["gradient_accumulation_steps"] = accumulation_for(total, section, world_size())
    if cfg.data.token_budget is not None:
        section["max_steps"] = steps_for_budget(cfg.data.token_budget, cfg.data.block_size, section)
    if not has_validation(cfg):
        section["eval_strategy"] = "no"
    section.setdefault("batch_eval_metrics", True)
    section.setdefault("remove_unused_columns", False)  # the collator picks its columns (and counts `source`)
    section.setdefault("save_only_model", False)
    try:
        return TrainingArguments(**section)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"training: {str(err).strip().splitlines()[0]}") from None


def has_validation(cfg: IgeaConfig) -> bool:
    return cfg.data.validation_path is not None or bool(cfg.data.validation_split)


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


def check_block_size(cfg: IgeaConfig) -> None:
    """Refuse blocks longer than the positions the model was built for."""
    context = model_context_length(base_model_path(cfg), cfg.model)
    if context is not None and cfg.data.block_size > context:
        raise ConfigError(
            f"data.block_size: {cfg.data.block_size} is longer than the model's context ({context} positions)"
        )


# ----------------------------------------------------------------------------------------------------------
# Final outputs


def save_run(trainer: Trainer, cfg: IgeaConfig, metrics: dict[str, Any]) -> None:
    """Final weights (safetensors), tokenizer, metrics.json and, last, the finished-run marker.

    The model is saved into a staging directory and each file renamed into place, so no reader (nor a crash)
    ever sees a half-written weight file next to a finished-run marker.
    """
    out = cfg.output_dir
    staging = out / ".final.tmp"
    trainer.save_model(str(staging))
    if not trainer.is_world_process_zero():
        return
    for item in staging.iterdir():
        os.replace(item, out / item.name)
    staging.rmdir()
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / "log_history.json", trainer.state.log_history)
    write_json_atomic(out / RUN_MARKER, {"config": cfg.to_dict(), "versions": framework_versions(),
                                         "layout": batch_layout(trainer.args), "metrics": metrics})


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
