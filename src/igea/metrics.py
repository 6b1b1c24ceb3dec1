"""Next-token metrics shared by training and evaluation, defined as transformers' run_clm.py defines them."""

from __future__ import annotations

import math

import torch
from transformers import EvalPrediction

IGNORE_INDEX = -100


def argmax_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Keep only the predicted token ids, so evaluation never holds a whole vocabulary of logits per token."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


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


class TokenAccuracy:
    """`compute_metrics` for the Trainer: next-token accuracy, accumulated batch by batch.

    Works with `batch_eval_metrics=True` (counts kept across calls until `compute_result`) and without it
    (one call with every prediction).
    """

    def __init__(self) -> None:
        self.correct = 0
        self.counted = 0

    def __call__(self, eval_pred: EvalPrediction, compute_result: bool = True) -> dict[str, float]:
        correct, counted = count_correct(eval_pred.predictions, eval_pred.label_ids)
        self.correct += correct
        self.counted += counted
        if not compute_result:
            return {}
        accuracy = self.correct / self.counted if self.counted else float("nan")
        self.correct = self.counted = 0
        return {"accuracy": accuracy}
