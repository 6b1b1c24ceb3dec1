"""Next-token metrics shared by training and evaluation, defined as transformers' run_clm.py defines them.

Evaluation keeps, per sequence, only the argmax predictions and the summed negative log-likelihood, so it
never holds a vocabulary of logits per token, and its loss is exactly token-weighted however the blocks were
batched or spread over processes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import EvalPrediction

IGNORE_INDEX = -100


def argmax_and_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`preprocess_logits_for_metrics`: predicted token ids, and each sequence's summed next-token NLL."""
    if isinstance(logits, tuple):
        logits = logits[0]
    shifted = logits[:, :-1].float().transpose(1, 2)
    nll = F.cross_entropy(shifted, labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none").sum(dim=-1)
    return logits.argmax(dim=-1), nll


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
