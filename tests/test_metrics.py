"""Next-token accuracy, as transformers' run_clm.py defines it, against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, EvalPrediction

from igea import metrics
from igea.arguments import training_arguments
from igea.data import BlockCollator, PreparedData, pack_blocks
from igea.evaluate import held_out_metrics
from igea.metrics import NextTokenMetrics, argmax_and_nll, count_correct, perplexity
from igea.trainer import build_trainer

from conftest import make_config


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


def previous_argmax_and_nll(logits, labels):
    """The formula evaluation used before issue 19: a float, shifted and transposed copy of the logits."""
    shifted = logits[:, :-1].float().transpose(1, 2)
    nll = F.cross_entropy(shifted, labels[:, 1:], ignore_index=-100, reduction="none").sum(dim=-1)
    return logits.argmax(dim=-1), nll


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_nll_equals_the_previous_formula_and_leaves_the_logits_unchanged(dtype, monkeypatch):
    torch.manual_seed(0)
    logits = (torch.randn(5, 12, 300) * 4).to(dtype)
    logits[0, 2, 17] = logits[0, 2, 18] = logits[0, 2].max() + 1  # a tie: the first of the two is predicted
    labels = torch.randint(0, 300, (5, 12))
    labels[:, 0] = labels[1, 5] = labels[3, 7] = -100  # document starts (packing: documents)
    labels[4, 1:] = -100  # a sequence with nothing to predict
    monkeypatch.setattr(metrics, "CPU_CHUNK", 7 * 300)  # several chunks, one ending in the middle of a sequence
    given = logits.clone()
    predictions, nll = argmax_and_nll(logits, labels)
    expected_predictions, expected_nll = previous_argmax_and_nll(logits, labels)
    assert torch.equal(logits, given) and predictions[0, 2] == 17
    assert nll.dtype == torch.float32 and nll.shape == (5,) and nll[4] == 0
    assert torch.equal(predictions, expected_predictions)
    torch.testing.assert_close(nll, expected_nll, rtol=1e-6, atol=1e-6)


def test_a_batch_of_a_real_vocabulary_is_scored_in_a_few_large_ops_on_a_cpu(monkeypatch):
    """Each op on a CPU ends with its threads waiting for each other, long when other jobs hold the cores: a
    batch is scored many rows at a time, not a megabyte (5 rows of 49,152) at a time."""
    calls, original = [], torch.log_softmax
    monkeypatch.setattr(torch, "log_softmax", lambda x, *a, **k: calls.append(len(x)) or original(x, *a, **k))
    torch.manual_seed(0)
    logits = torch.randn(3, 128, 49152)
    labels = torch.randint(0, 49152, (3, 128))
    predictions, nll = argmax_and_nll(logits, labels)

    assert calls == [85, 85, 85, 85, 44]  # 2**22 logits (16 MiB of float32) at a time, not 5 rows
    expected = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none").sum(dim=-1)
    torch.testing.assert_close(nll, expected, rtol=1e-6, atol=1e-4)
    assert torch.equal(predictions, logits.argmax(dim=-1))


@pytest.fixture(scope="module")
def document_blocks(tmp_path_factory, tiny_model_dir, corpus_file):
    """Blocks of 32 tokens packed by document from the abstracts' sentences: many document starts."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sentences = corpus_file.read_text(encoding="utf-8").replace("\n", " ").split(". ")[:60]
    documents = [tokenizer(s, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for s in sentences]
    blocks, _ = pack_blocks(Dataset.from_dict({"input_ids": documents}), 32, "documents",
                            str(tmp_path_factory.mktemp("blocks")))
    return blocks.select(range(11))  # batches of 3: the last one holds 2


def test_training_and_igea_eval_compute_the_same_metrics_and_the_nll_once(
        document_blocks, tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    """Training's evaluation and `igea eval` agree with the previous formula, and neither asks the model for a
    loss of its own (a second cross-entropy over the vocabulary) beside the metrics' NLL."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tally = NextTokenMetrics()
    with torch.no_grad():
        for start in range(0, len(document_blocks), 3):
            batch = BlockCollator()([document_blocks[i] for i in range(start, min(start + 3, len(document_blocks)))])
            labels = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits  # no cache: documents are masked apart
            tally(EvalPrediction(predictions=previous_argmax_and_nll(logits, labels), label_ids=labels),
                  compute_result=False)
    expected = tally.result()
    assert expected["tokens"] < len(document_blocks) * 31  # the document starts are not targets

    cross_entropies = []
    original = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: cross_entropies.append(a[0].shape) or original(*a, **k))
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, training={"per_device_eval_batch_size": 3})
    data = PreparedData(document_blocks, {"validation": document_blocks})
    trainer = build_trainer(cfg, training_arguments(cfg), model, None, data)
    trained = trainer.evaluate()
    held_out = held_out_metrics(model, document_blocks, batch_size=3)
    assert cross_entropies == []

    assert trained["eval_tokens"] == held_out["tokens"] == expected["tokens"]
    assert trained["eval_accuracy"] == held_out["accuracy"] == expected["accuracy"]
    assert trained["eval_loss"] == held_out["loss"]
    assert trained["eval_loss"] == pytest.approx(expected["token_loss"], rel=1e-6)
    assert list(trained)[0] == "eval_loss"  # the loss leads the logged line
