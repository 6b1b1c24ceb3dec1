"""Next-token accuracy, as transformers' run_clm.py defines it, against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import EvalPrediction

from igea.metrics import NextTokenMetrics, argmax_and_nll, count_correct, perplexity


def test_accuracy_scores_prediction_i_against_label_i_plus_1():
    # labels:      [5, 6, 7, 8]   targets (shifted): 6, 7, 8
    # predictions: [6, 0, 8, 1]   compared: 6==6 yes, 0==7 no, 8==8 yes  -> 2 of 3
    predictions = torch.tensor([[6, 0, 8, 1]])
    labels = torch.tensor([[5, 6, 7, 8]])
    assert count_correct(predictions, labels) == (2, 3)


def test_ignored_labels_are_not_counted():
    predictions = torch.tensor([[1, 2, 3, 4], [9, 9, 9, 9]])
    labels = torch.tensor([[0, 1, -100, 3], [0, 9, 1, -100]])
    # row 0 targets 1, -100, 3 vs preds 1, 2, 3 -> 2 of 2 counted; row 1 targets 9, 1, -100 vs 9, 9, 9 -> 1 of 2
    assert count_correct(predictions, labels) == (3, 4)


def test_batched_accumulation_equals_one_call_and_a_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(6, 10, 50)
    labels = torch.randint(0, 50, (6, 10))
    labels[2, 3:] = -100
    outputs = argmax_and_nll(logits, labels)
    whole = NextTokenMetrics()(EvalPrediction(predictions=outputs, label_ids=labels))
    batched = NextTokenMetrics()
    batched(EvalPrediction(predictions=(outputs[0][:4], outputs[1][:4]), label_ids=labels[:4]), compute_result=False)
    last = batched(EvalPrediction(predictions=(outputs[0][4:], outputs[1][4:]), label_ids=labels[4:]))

    predictions, targets = logits.argmax(-1)[:, :-1], labels[:, 1:]
    mask = targets != -100
    hand_accuracy = (predictions == targets)[mask].float().mean().item()
    log_probs = logits[:, :-1].log_softmax(-1)
    hand_loss = -log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask].mean().item()
    for result in (whole, last):
        assert result["accuracy"] == pytest.approx(hand_accuracy, abs=1e-7)
        assert result["token_loss"] == pytest.approx(hand_loss, abs=1e-5)


def test_perplexity():
    assert perplexity(math.log(20.0)) == pytest.approx(20.0)
    assert perplexity(1e6) == math.inf
