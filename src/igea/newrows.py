"""New embedding rows for the tokens `igea.vocab` adds: where they start, how they are fitted and distilled.

Each new token's embeddings start from the base pieces it is made of: the input embedding is a weighted mean
leaning on the last pieces (what the model has read when the word ends); the output embedding is fitted so
that, where the token occurs in the corpus, its logit is what the base model gave the whole chain of pieces
(the first piece's logit plus the log-probability of the others after it), starting from a weighted mean that
leans on the first pieces. Tied embeddings stay tied: their one row starts as the plain mean and is fitted the
same way. Then the new rows, and only they, are distilled from the base model: one pass over the fit
documents moves them so that the extended model gives no token of the text less log-probability than the
base model gave its pieces there. This teaches the new rows what one row cannot get from a mean: where not to
fire (a word seen earlier in a text is not the next word everywhere), and what a tied row must do as input
and output at once. The extended model, untrained, then reads text about as the base model did (Hewitt 2021
on why the mean alone is not enough; BENCHMARKS.md measures each step).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from igea.progress import Progress

logger = logging.getLogger(__name__)

FIT_DOCUMENTS = 1000
"""Corpus documents the fit and the distillation read by default on a GPU (the first ones, up to FIT_CONTEXT
tokens each), and at most by default on a CPU (CPU_BUDGET)."""
CPU_BUDGET = 7e12
"""On a CPU, the default fit reads at most this many parameter-tokens (the model's parameters × FIT_CONTEXT × the
documents), as its cost grows with both: a model up to 13M parameters reads FIT_DOCUMENTS, a 135M-parameter one
101 (9 minutes on 2 cores for the whole of `igea vocab`; a quarter of the plain mean's untrained penalty on the
benchmark's model), a 1B one 13 (BENCHMARKS.md, "Domain vocabulary")."""
FIT_CONTEXT = 512
"""Tokens of each of those documents read (the rest of a longer document is not used)."""
FIT_OCCURRENCES = 64
"""Occurrences of a new token used in its fit, at most."""
RIDGE = 1.0
"""Strength of the fit's pull towards the starting row, relative to the mean squared norm of the hidden states."""
DISTIL_BATCH = 4
"""Fit documents per step of the distillation (one pass over them)."""
DISTIL_LR = 0.05
"""Adam step size of the distillation, relative to the standard deviation of the base's rows of each matrix."""
INIT = ("input rows: weighted means of the pieces' rows, each piece twice the one before it; output rows: weighted "
        "means, each piece half the one before it, fitted (ridge) so that the token's logit where it occurs in the "
        "corpus is its chain of pieces' logit in the base model; tied rows: the plain mean, fitted the same way; "
        "then the new rows alone distilled from the base model on the fit documents (no token's log-probability "
        "below its pieces' log-probability in the base model)")
START_ONLY = ("input rows: weighted means of the pieces' rows, each piece twice the one before it; output rows: "
              "weighted means, each piece half the one before it; tied rows: the plain mean (no fit documents: not "
              "fitted, not distilled)")


def default_fit_documents(model: PreTrainedModel) -> tuple[int, str]:
    """How many documents the fit and the distillation read when not told, and why, in words.

    FIT_DOCUMENTS on a GPU. On a CPU, as many as CPU_BUDGET allows for the model's size (at most FIT_DOCUMENTS):
    a number that depends on the model alone, so that the same command gives the same rows on every CPU.
    """
    if model.device.type != "cpu":
        return FIT_DOCUMENTS, f"the default on {model.device.type}"
    parameters = model.num_parameters()
    documents = min(FIT_DOCUMENTS, int(CPU_BUDGET // (parameters * FIT_CONTEXT)))
    if documents == FIT_DOCUMENTS:
        return documents, "the default"
    return documents, (f"the default on a CPU for {parameters / 1e6:,.0f}M parameters: a budget of {CPU_BUDGET:.0e} "
                       f"parameter-tokens, parameters × {FIT_CONTEXT} × documents; {FIT_DOCUMENTS:,} on a GPU")


def piece_weights(count: int, later: bool) -> torch.Tensor:
    """Weights of a new token's `count` pieces: each piece weighs twice the one before it (`later`) or half."""
    weights = 2.0 ** torch.arange(count, dtype=torch.float32)
    weights = weights if later else weights.flip(0)
    return weights / weights.sum()


@torch.no_grad()
def resize_and_initialise(model: PreTrainedModel, new_ids: list[int], piece_ids: list[list[int]],
                          contexts: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Grow the embedding matrices to hold `new_ids` and give each new row its start from its pieces' rows.

    Input rows: weighted means, each piece twice the one before it (what the model has read when a word
    ends). Output rows: weighted means the other way (what must be predicted first), then fitted to
    `contexts` (`BaseReading.contexts`) where the token occurs there. Tied rows: the plain mean, fitted the same
    way. Measured on held-out text against the plain mean and transformers' default: BENCHMARKS.md.
    """
    contexts = contexts or {}
    rows = max(model.get_input_embeddings().num_embeddings, max(new_ids) + 1)
    if rows != model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(rows, mean_resizing=False)
    inputs = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is None or output.weight.data_ptr() == inputs.data_ptr()
    for new_id, ids in zip(new_ids, piece_ids, strict=True):
        pieces = inputs[ids].float()
        if tied:
            row = fit_row(pieces.mean(dim=0), contexts.get(new_id)) if output is not None else pieces.mean(dim=0)
            inputs[new_id] = row.to(inputs.dtype)
            continue
        inputs[new_id] = (piece_weights(len(ids), later=True) @ pieces).to(inputs.dtype)
        start = piece_weights(len(ids), later=False) @ output.weight[ids].float()
        output.weight[new_id] = fit_row(start, contexts.get(new_id)).to(output.weight.dtype)


def fit_row(start: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """`start` moved, as little as ridge regression allows, so that hidden states `H` give logits `y`.

    Solved in its dual form (one small system per token, of the size of its occurrences):
    `start + Hᵀ (H Hᵀ + λ I)⁻¹ (y - H start)`, with λ = RIDGE × the mean of |h|².
    """
    if context is None:
        return start
    hidden, target = (t.to(start.device, torch.float32) for t in context)
    gram = hidden @ hidden.T
    ridge = RIDGE * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], device=gram.device)
    return start + hidden.T @ torch.linalg.solve(gram + ridge * eye, target - hidden @ start)


@dataclass
class BaseReading:
    """What the base model makes of the fit documents: what the new rows are fitted to."""

    contexts: dict[int, tuple[torch.Tensor, torch.Tensor]]
    """Per new token id, up to FIT_OCCURRENCES occurrences: the hidden state the output layer sees before the
    token's first piece, and the chain's logit there (the logit that gives the new token the chain's probability)."""
    documents: list[tuple[list[int], torch.Tensor]]
    """Per document: its extended token ids after an EOS token, and for each of them (after the EOS) the base
    model's log-probability of its pieces there."""


@torch.no_grad()
def read_with_base(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, extended: PreTrainedTokenizerBase,
                   texts: Sequence[str], pieces: dict[int, list[int]]) -> BaseReading:
    """Read `texts` with the base `model`, each after an EOS token, its first FIT_CONTEXT base tokens.

    `pieces` gives each new token id's base token ids. The chain's logit is the first piece's logit plus the
    log-probability of the other pieces after it. A document's extended tokens are followed only as far as
    they line up with its base tokens (all of it, unless cut by FIT_CONTEXT).
    """
    model.eval()
    output = model.get_output_embeddings()
    seen: dict[int, list[torch.Tensor]] = defaultdict(list)
    chain: dict[int, list[float]] = defaultdict(list)
    documents: list[tuple[list[int], torch.Tensor]] = []
    captured: list[torch.Tensor] = []
    hook = None if output is None else output.register_forward_hook(
        lambda module, args, result: captured.append(args[0]))
    logger.info("the base model reads %d documents (up to %d tokens each) for the fit", len(texts), FIT_CONTEXT)
    try:
        with Progress("the base model's reading", len(texts), "documents", logger=logger) as progress:
            for text in texts:
                ids = [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]][:FIT_CONTEXT]
                if len(ids) >= 2:
                    captured.clear()
                    logits = model(torch.tensor([ids], device=model.device), use_cache=False).logits[0].float()
                    read_document(logits, captured[0][0] if captured else None, ids,
                                  extended(text, add_special_tokens=False)["input_ids"], pieces, seen, chain, documents)
                progress.update()
    finally:
        if hook is not None:
            hook.remove()
    contexts = {token: (torch.stack(rows), torch.tensor(chain[token])) for token, rows in seen.items()}
    return BaseReading(contexts, documents)


def read_document(logits: torch.Tensor, hidden: torch.Tensor | None, ids: list[int], extended_ids: list[int],
                  pieces: dict[int, list[int]], seen: dict[int, list[torch.Tensor]], chain: dict[int, list[float]],
                  documents: list[tuple[list[int], torch.Tensor]]) -> None:
    """What `read_with_base` keeps of one document: its base `logits` and the output layer's input `hidden` over
    its base `ids` (an EOS first), followed along its `extended_ids`. The logits and hidden states stay where
    they are (a GPU) but for the few values kept, fetched at once."""
    logp = logits[:-1].log_softmax(-1).gather(1, torch.tensor(ids[1:], device=logits.device)[:, None])[:, 0]
    cumulative = [0.0, *torch.cumsum(logp.double(), 0).tolist()]  # logp[i:j].sum() = cumulative[j] - cumulative[i]
    merged, targets = [ids[0]], []
    occurrences: list[tuple[int, int, int, float]] = []  # token, where, its first piece, the other pieces' logp
    kept: Counter[int] = Counter()
    position = 1  # of the next base token in `ids`
    for token in extended_ids:
        chunk = pieces.get(token, [token])
        end = position + len(chunk)
        if end > len(ids) or ids[position:end] != chunk:
            break  # past FIT_CONTEXT (or not the base segmentation): the rest of the text is not used
        if token in pieces and hidden is not None and len(seen[token]) + kept[token] < FIT_OCCURRENCES:
            kept[token] += 1
            occurrences.append((token, position - 1, chunk[0], cumulative[end - 1] - cumulative[position]))
        merged.append(token)
        targets.append(cumulative[end - 1] - cumulative[position - 1])
        position = end
    if occurrences:
        where = torch.tensor([at for _, at, _, _ in occurrences], device=logits.device)
        first = logits[where, torch.tensor([piece for _, _, piece, _ in occurrences], device=logits.device)]
        states = hidden[where].float().cpu()
        for (token, _, _, rest), state, logit in zip(occurrences, states, first.float().tolist(), strict=True):
            seen[token].append(state)
            chain[token].append(logit + rest)
    if targets:
        documents.append((merged, torch.tensor(targets)))


def distil(model: PreTrainedModel, documents: list[tuple[list[int], torch.Tensor]],
           new_ids: list[int]) -> dict[str, Any]:
    """Move the new rows of the extended `model`, and nothing else, towards the base model it was made from.

    One pass over `documents` (`BaseReading.documents`), DISTIL_BATCH at a time, Adam on the mean squared
    shortfall of the extended model's log-probability of each token below the base model's of its pieces: a
    new token predicted where it does not come (so the token that does come gets less than in the base
    model), or too rarely where it does, is corrected, and so is what a new token's input row makes the model
    predict after it. A token already as likely as in the base model adds nothing: the base model is the
    floor to reach, not a text to learn. Returns the documents, tokens and steps, and the loss of the first
    and last tenth of the steps.
    """
    matrices = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                if m is not None}
    rows = torch.tensor(new_ids, device=model.device)
    trainable = [(weight, torch.nn.Parameter(weight.detach()[rows].float())) for weight in matrices.values()]
    scales = [weight.detach()[:min(new_ids)].float().std().item() for weight, _ in trainable]
    optimizer = torch.optim.Adam([{"params": [new], "lr": DISTIL_LR * scale}
                                  for (_, new), scale in zip(trainable, scales, strict=True)])
    wanted = [p.requires_grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    for weight, _ in trainable:
        weight.requires_grad_(True)
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(0)).tolist()
    losses, tokens = [], 0
    steps = range(0, len(order), DISTIL_BATCH)
    logger.info("distilling the new rows on %d documents, %d at a time (%d steps)", len(documents), DISTIL_BATCH,
                len(steps))
    try:
        with Progress("the distillation", len(steps), "steps", logger=logger) as progress:
            for start in steps:
                ids, mask, target = padded([documents[i] for i in order[start:start + DISTIL_BATCH]], model.device)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
                logp = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
                counted = mask[:, 1:].float()
                loss = ((target - logp).clamp_min(0) ** 2 * counted).sum() / counted.sum()
                loss.backward()
                for weight, new in trainable:
                    new.grad = weight.grad[rows].float()
                    weight.grad = None
                optimizer.step()
                optimizer.zero_grad()
                with torch.no_grad():
                    for weight, new in trainable:
                        weight[rows] = new.to(weight.dtype)
                losses.append(loss.item())
                tokens += int(counted.sum())
                progress.update()
    finally:
        for parameter, flag in zip(model.parameters(), wanted, strict=True):
            parameter.requires_grad_(flag)
    tenth = max(1, len(losses) // 10)
    return {"documents": len(documents), "tokens": tokens, "steps": len(losses),
            "loss": loss_change(losses[:tenth], losses[-tenth:]) if losses else None}


def padded(batch: list[tuple[list[int], torch.Tensor]],
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of `BaseReading.documents` as tensors: the token ids (padded with the first id), the attention
    mask, and the base model's log-probabilities to reach (0 where padded)."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.tensor([ids + [ids[0]] * (width - len(ids)) for ids, _ in batch], device=device)
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=device)
    target = torch.zeros(len(batch), width - 1, device=device)
    for i, (_, values) in enumerate(batch):
        target[i, :len(values)] = values.to(device)
    return ids, mask, target


def loss_change(first: list[float], last: list[float]) -> dict[str, float]:
    """The mean loss of the first and the last steps, and the relative change (after / before - 1)."""
    before, after = sum(first) / len(first), sum(last) / len(last)
    return {"before": before, "after": after, "change": after / before - 1 if before else float("nan")}
