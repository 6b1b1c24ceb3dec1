"""Next-token metrics shared by training and evaluation, defined as transformers' run_clm.py defines them.

Evaluation keeps, per sequence, only the argmax predictions and the summed negative log-likelihood, so it
never holds a vocabulary of logits per token, and its loss is exactly token-weighted however the blocks were
batched or spread over processes. Each token's NLL is computed once: the model is not asked for its own loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import EvalPrediction

IGNORE_INDEX = -100


CPU_CHUNK = 2**22
"""Logits scored at a time on a CPU (16 MiB of float32: 85 rows of a 49,152-token vocabulary). Every op on a CPU
is a parallel region whose threads wait for each other at its end, a wait that grows long when other jobs share
the cores, so a batch is scored in a few dozen large ops rather than thousands of small ones; the chunk's float32
log-probabilities still fit in a shared (L3) cache, and the log-softmax keeps each row in a core's own."""
DEVICE_CHUNK = 2**26
"""Logits scored at a time on an accelerator (256 MiB of float32): half-precision logits are upcast a chunk at a
time, never as a float copy of the whole batch."""


def argmax_and_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`preprocess_logits_for_metrics`: predicted token ids, and each sequence's summed next-token NLL.

    The NLL at position i is that of label i + 1 (the last position has none), as the model's own loss defines
    it: minus the target's log-softmax, in float32. It is computed chunk by chunk from the logits as they are
    (no shifted, transposed or whole-batch float copy): one fused log-softmax per chunk into a reused float32
    buffer, and one argmax over the batch. It is the evaluation's only log-softmax: the model is not asked for
    its own loss (`IgeaTrainer.prediction_step`), which would be a second one.
    """
    if isinstance(logits, tuple):
        logits = logits[0]
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
    flat = logits.flatten(0, 1)
    count, vocab = flat.shape
    rows = max(1, (CPU_CHUNK if flat.device.type == "cpu" else DEVICE_CHUNK) // vocab)
    log_probs = torch.empty((min(rows, count), vocab), dtype=torch.float32, device=flat.device)
    index = targets.clamp(min=0).unsqueeze(-1)
    picked = torch.empty(count, dtype=torch.float32, device=flat.device)
    for start in range(0, count, rows):
        chunk = flat[start : start + rows]
        scored = torch.log_softmax(chunk, dim=-1, dtype=torch.float32, out=log_probs[: len(chunk)])
        picked[start : start + len(chunk)] = scored.gather(-1, index[start : start + len(chunk)]).squeeze(-1)
    nll = torch.where(targets == IGNORE_INDEX, 0.0, -picked)
    return flat.argmax(dim=-1).view(logits.shape[:2]), nll.view(logits.shape[:2]).sum(dim=-1)


def count_correct(predictions: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, counted) next-token predictions: prediction at position i is scored against label i + 1."""
    predictions = torch.as_tensor(predictions)[:, :-1]
    labels = torch.as_tensor(labels)[:, 1:]
    mask = labels != IGNORE_INDEX
    return int((predictions[mask] == labels[mask]).sum()), int(mask.sum())


def perplexity(loss: float) -> float:
    """exp(loss), or inf when that overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


class NextTokenMetrics:
    """`compute_metrics` for the Trainer: next-token accuracy and token-weighted loss, accumulated per batch.

    Works with `batch_eval_metrics=True` (sums kept across calls until `compute_result`) and without it
    (one call with everything). Predictions are what `argmax_and_nll` returned.
    """

    def __init__(self) -> None:
        self.correct = self.counted = 0
        self.nll = 0.0

    def __call__(self, eval_pred: EvalPrediction, compute_result: bool = True) -> dict[str, float]:
        predictions, nll = eval_pred.predictions
        correct, counted = count_correct(predictions, eval_pred.label_ids)
        self.correct += correct
        self.counted += counted
        self.nll += float(torch.as_tensor(nll, dtype=torch.float64).sum())
        return self.result() if compute_result else {}

    def result(self) -> dict[str, float]:
        """Accuracy, token-weighted loss and the number of scored tokens so far; then start counting afresh."""
        if self.counted == 0:
            result = {"accuracy": float("nan"), "token_loss": float("nan"), "tokens": 0}
        else:
            result = {"accuracy": self.correct / self.counted, "token_loss": self.nll / self.counted,
                      "tokens": self.counted}
        self.correct = self.counted = 0
        self.nll = 0.0
        return result


def combined(results: list[dict[str, float]]) -> dict[str, float]:
    """Loss, perplexity, accuracy and tokens of several evaluations together: the token-weighted means."""
    tokens = sum(r["tokens"] for r in results)
    if not tokens:
        return {"loss": math.nan, "perplexity": math.nan, "accuracy": math.nan, "tokens": 0}
    loss = sum(r["loss"] * r["tokens"] for r in results) / tokens
    accuracy = sum(r["accuracy"] * r["tokens"] for r in results) / tokens
    return {"loss": loss, "perplexity": perplexity(loss), "accuracy": accuracy, "tokens": tokens}
