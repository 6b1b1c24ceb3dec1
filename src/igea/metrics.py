"""Next-token metrics shared by training and evaluation, defined as transformers' run_clm.py defines them.

Evaluation keeps, per sequence, only the argmax predictions and the summed negative log-likelihood, so it
never holds a vocabulary of logits per token, and its loss is exactly token-weighted however the blocks were
batched or spread over processes. The NLL is computed once per token, by one cross-entropy over the logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import EvalPrediction

IGNORE_INDEX = -100


NLL_CHUNK = 2**26
"""Logits upcast to float32 at a time (256 MiB) when the model computes in half precision: the NLL is exact
without a float copy of the whole batch's logits. float32 logits are used as they are, in one call."""


def argmax_and_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`preprocess_logits_for_metrics`: predicted token ids, and each sequence's summed next-token NLL.

    The NLL at position i is that of label i + 1, in float32, as the model's own loss computes it: the labels
    are shifted (the last position has none), the logits are read in place, with no shifted, transposed or
    whole-batch float copy. It is the evaluation's only cross-entropy (`IgeaTrainer.prediction_step` does not
    ask the model for its loss).
    """
    if isinstance(logits, tuple):
        logits = logits[0]
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
    flat = logits.flatten(0, 1)
    half = flat.dtype in (torch.float16, torch.bfloat16)
    rows = max(1, NLL_CHUNK // flat.shape[-1] if half else len(flat))
    nll = torch.cat([
        F.cross_entropy(flat[i : i + rows].float(), targets[i : i + rows], ignore_index=IGNORE_INDEX,
                        reduction="none")
        for i in range(0, len(flat), rows)
    ])
    return logits.argmax(dim=-1), nll.view(logits.shape[:2]).sum(dim=-1)


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
