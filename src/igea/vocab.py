"""Domain vocabulary: new tokens for what a base tokenizer splits into many pieces in a domain corpus.

The base tokenizer's BPE is continued on the corpus: its words are segmented as the base tokenizer segments
them, and the most frequent adjacent pair of pieces inside a word is merged, N times (BPE training, started
from the base segmentation). Each merge becomes a new token and a new BPE merge rule, ranked after all the
old ones, so the extended tokenizer first segments text exactly as the base one did and then applies the
new merges: old token ids and old segmentations of other text are unchanged, and a domain word in running
text gets its new token whatever precedes or follows it. (`tokenizer.add_tokens` does not do this: added
tokens are matched in the raw text before pre-tokenization, inside longer words too, and the space before a
word is left as a token of its own; `bench/bench_vocab.py` measures both.)

Each new token's embeddings start from the base pieces it is made of, fitted and distilled so that the
extended model, untrained, reads text about as the base model did (`igea.newrows`). Only BPE tokenizers
(byte-level as GPT-2 and Llama 3, or SentencePiece-style with '▁' as Mistral, Llama 2 and Minerva) can be
extended this way.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from igea.blockstore import HeldOut
from igea.config import DataConfig, IgeaConfig, ModelConfig, SourceConfig, resolve_local_files
from igea.data import clean_corpus, load_corpus, split_corpus
from igea.errors import IgeaError, one_line
from igea.modeling import (
    auto_tokenizer,
    configured_model_path,
    ensure_tiny_model,
    load_causal_lm,
    to_device,
)
from igea.newrows import (
    INIT,
    START_ONLY,
    BaseReading,
    default_fit_documents,
    distil,
    read_with_base,
    resize_and_initialise,
)
from igea.progress import Progress, bars_off_in_logs, duration, timed
from igea.rundir import share_like_other_files, write_json_atomic

logger = logging.getLogger(__name__)

REPORT = "igea_vocab.json"
"""Written into an extended model's directory: what was added, from which corpus, and the measurements."""
EXTENDED_DIR = "base-model-extended"
"""Where a run with `model.extend_vocabulary` keeps its extended base model, inside `training.output_dir`."""
HELDOUT_FRACTION = 0.05
"""Share of the corpus documents kept out of the counts to measure fertility on, when no held-out text is given."""
BPB_DOCUMENTS = 200
"""Held-out documents scored for bits per byte (the first ones), when asked to."""
MIN_COUNT = 2
"""A merge must save at least this many tokens in the corpus to become a new token."""
WORD_START = re.compile("(?=\u2581)")  # SentencePiece-style text is one piece: split it before each '▁'
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # byte-fallback tokens are not text and are never merged


@dataclass
class Merge:
    """One learned merge rule, `left` + `right` -> `token` (spelled as in the BPE vocabulary), and how often it
    applied in the corpus."""

    left: str
    right: str
    token: str
    count: int


@bars_off_in_logs
def extend_vocabulary(
    model: str,
    texts: Sequence[str],
    num_tokens: int,
    output_dir: str | Path,
    *,
    heldout_texts: Sequence[str] | None = None,
    measure_bits_per_byte: bool = False,
    model_config: ModelConfig | None = None,
    corpus: str | list[str] | None = None,
    fit_documents: int | None = None,
    bits_per_byte_documents: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Add up to `num_tokens` domain tokens learned on `texts` to `model` and save the result in `output_dir`.

    `model` is a model directory or hub id. The saved directory (safetensors weights, tokenizer) loads with
    `from_pretrained` and works as `model.name_or_path`. Returns the report also saved as `igea_vocab.json`:
    the new tokens with their base pieces and corpus counts, and fertility (tokens per word) before and after
    on `heldout_texts` (and, with `measure_bits_per_byte`, the untrained models' bits per byte there).
    `model_config` gives the loading settings (dtype, revision, trust_remote_code); `corpus` is only recorded.

    What it costs: the new rows are fitted and distilled on the first `fit_documents` of `texts` (a forward pass
    of the base model, a forward and backward pass of the extended one, each document); 0 keeps the rows'
    start (weighted means of their pieces' rows). By default FIT_DOCUMENTS on a GPU, fewer on a CPU for a large
    model (`igea.newrows.default_fit_documents`). Bits per byte reads `bits_per_byte_documents` held-out
    documents with each model (by default BPB_DOCUMENTS, on a CPU no more than the default fit). `device`:
    where the models run (default: CUDA when available).
    """
    if num_tokens < 1:
        raise IgeaError(f"num_tokens: {num_tokens!r} is not allowed; it must be at least 1")
    if fit_documents is not None and fit_documents < 0:
        raise IgeaError(f"fit_documents: {fit_documents!r} is not allowed; it must be >= 0")
    if bits_per_byte_documents is not None and bits_per_byte_documents < 1:
        raise IgeaError(f"bits_per_byte_documents: {bits_per_byte_documents!r} is not allowed; it must be at least 1")
    check_device(device, "device")
    started = time.monotonic()
    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    model_config = model_config or ModelConfig(name_or_path=model)
    tokenizer = auto_tokenizer(model, model_config)  # model.tokenizer for a checkpoint saved without one
    check_extensible(tokenizer, model)
    merges = learn_merges(tokenizer, texts, num_tokens)
    if not merges:
        raise IgeaError(f"the corpus has no pair of pieces that occurs {MIN_COUNT} times inside a word; "
                        "give it more text")
    with timed(logger, f"loading {model}", "model loaded"):
        lm = to_device(load_causal_lm(model, model_config), device)  # on a GPU when there is one
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokens = list(dict.fromkeys(m.token for m in merges))  # two merge rules may make the same token
    with timed(logger, "saving the extended tokenizer", "extended tokenizer saved"):
        new_ids = save_extended_tokenizer(tokenizer, merges, tokens, tmp)
        extended = AutoTokenizer.from_pretrained(tmp)
    check_ids(extended, tokens, new_ids)
    pieces = base_pieces(merges)
    piece_ids = [tokenizer.convert_tokens_to_ids(pieces[t]) for t in tokens]
    fit = give_new_rows(lm, tokenizer, extended, texts, new_ids, piece_ids, fit_documents)
    with timed(logger, f"saving the extended model in {tmp}", "extended model saved"):
        lm.save_pretrained(tmp)
        share_like_other_files(tmp)

    heldout = list(heldout_texts) if heldout_texts else list(texts)
    report: dict[str, Any] = {
        "base_model": model,
        "corpus": corpus,
        "documents": len(texts),
        "heldout_documents": len(heldout_texts or []),
        "num_tokens": num_tokens,
        "tokens_added": len(tokens),
        "vocab_size": {"before": len(tokenizer), "after": len(extended)},
        "embedding_rows": lm.get_input_embeddings().num_embeddings,
        "init": INIT if fit["distillation"] else START_ONLY,
        "fit": {key: value for key, value in fit.items() if key not in ("fitted_tokens", "distillation")},
        "fitted_tokens": fit["fitted_tokens"],
        "distillation": fit["distillation"],
    }
    with timed(logger, f"measuring fertility on {len(heldout)} documents and counting the corpus' tokens",
               "fertility measured"):
        report["fertility"] = compare(fertility(tokenizer, heldout), fertility(extended, heldout))
        report["corpus_tokens"] = compare(count_tokens(tokenizer, texts), count_tokens(extended, texts))
    if not heldout_texts:
        report["fertility"]["measured_on"] = "the corpus itself (no held-out text)"
    if measure_bits_per_byte:
        wanted = bits_per_byte_documents or max(1, min(BPB_DOCUMENTS, fit["default"]))
        sample = heldout[:wanted]
        after = bits_per_byte(lm, extended, sample, label="bits per byte, extended model")
        del lm
        base = to_device(load_causal_lm(model, model_config), device)
        before = bits_per_byte(base, tokenizer, sample, label="bits per byte, base model")
        report["bits_per_byte"] = compare(before, after)
        report["bits_per_byte"]["documents"] = len(sample)
    counts = Counter()
    for m in merges:
        counts[m.token] += m.count
    report["new_tokens"] = [
        {"token": t, "text": extended.convert_tokens_to_string([t]), "id": i, "pieces": pieces[t], "count": counts[t]}
        for t, i in zip(tokens, new_ids, strict=True)
    ]
    write_json_atomic(tmp / REPORT, report)
    if output_dir.exists():
        output_dir.rmdir()  # empty: check_output_dir said so
    tmp.replace(output_dir)
    logger.info("added %d tokens to %s: fertility %.3f -> %.3f tokens per word; saved in %s (in %s)", len(tokens),
                model, report["fertility"]["before"], report["fertility"]["after"], output_dir,
                duration(time.monotonic() - started))
    return report


def give_new_rows(lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, extended: PreTrainedTokenizerBase,
                  texts: Sequence[str], new_ids: list[int], piece_ids: list[list[int]],
                  fit_documents: int | None) -> dict[str, Any]:
    """Grow `lm` for the new tokens and give their rows a start, fitted and distilled on the first documents of
    `texts` (`fit_documents`, else the default for the model and its device: igea.newrows). Returns what was
    done: the documents asked, chosen and read, why, the device, the tokens fitted and the distillation."""
    default, why = default_fit_documents(lm)
    documents = min(default if fit_documents is None else fit_documents, len(texts))
    if fit_documents is not None:
        why = f"--fit-documents {fit_documents}"
    if documents:
        logger.info("the fit and the distillation read the first %d of %d documents on %s (%s; --fit-documents / "
                    "fit_documents sets it, 0 for none)", documents, len(texts), lm.device.type, why)
    else:
        logger.info("no fit and no distillation (%s): the new rows stay the weighted means of their pieces' rows",
                    why)
    reading = BaseReading({}, [])
    if documents:
        pieces = dict(zip(new_ids, piece_ids, strict=True))
        reading = read_with_base(lm, tokenizer, extended, texts[:documents], pieces)
    with timed(logger, f"the ridge fit: giving the {len(new_ids)} new tokens their rows ({len(reading.contexts)} "
                       "fitted where they occur)", "new rows ready"):
        resize_and_initialise(lm, new_ids, piece_ids, reading.contexts)
    distilled = distil(lm, reading.documents, new_ids) if reading.documents else None
    if distilled and distilled["loss"]:
        logger.info("new rows distilled on %d documents (%d tokens): mean squared shortfall %.3f -> %.3f",
                    distilled["documents"], distilled["tokens"], distilled["loss"]["before"],
                    distilled["loss"]["after"])
    return {"documents": documents, "asked": fit_documents, "default": default, "why": why,
            "documents_read": len(reading.documents), "device": lm.device.type,
            "fitted_tokens": len(reading.contexts), "distillation": distilled}


def check_device(device: str | None, key: str) -> None:
    """A device torch knows and this machine has (checked before any long work)."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise IgeaError(f"{key}: {device!r} is not a device ({one_line(str(err))}); choose cpu or cuda") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise IgeaError(f"{key}: {device!r} cannot be used: no CUDA device is available here; choose cpu")


def check_output_dir(output_dir: Path) -> None:
    """The extended model goes into a new or empty directory: nothing there is ever replaced."""
    if output_dir.is_file():
        raise IgeaError(f"output: '{output_dir}' is a file, not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise IgeaError(f"output: directory '{output_dir}' is not empty; choose a new one")


def check_extensible(tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """Only a fast tokenizer whose model is a plain BPE can be given new merges."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    kind = json.loads(backend.to_str())["model"] if backend is not None else {}
    if kind.get("type") != "BPE":
        raise IgeaError(f"the tokenizer of '{source}' is not a BPE tokenizer ({kind.get('type', 'slow')}); "
                        "only BPE vocabularies can be extended")
    if kind.get("continuing_subword_prefix") or kind.get("end_of_word_suffix"):
        raise IgeaError(f"the tokenizer of '{source}' marks subwords (continuing_subword_prefix/end_of_word_suffix); "
                        "only plain BPE vocabularies can be extended")


# ----------------------------------------------------------------------------------------------------------
# Learning the merges


def words(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    """The words of `text` in order, a word as the BPE model sees it (normalized, pre-tokenized).

    SentencePiece-style tokenizers may hand the model the whole text: it is cut before every '▁', as no merge
    crosses a word start.
    """
    backend = tokenizer.backend_tokenizer
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    parts = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer is not None else [(text, None)]
    return [word for part, _ in parts for word in WORD_START.split(part) if word]


def word_counts(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str],
                progress: Progress | None = None) -> Counter[str]:
    """How often each word (see `words`) occurs in `texts` (a document counted in `progress` when given)."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(words(tokenizer, text))
        if progress is not None:
            progress.update()
    return counts


def learn_merges(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], num_tokens: int) -> list[Merge]:
    """Continue the tokenizer's BPE on `texts`: merges that create up to `num_tokens` new tokens.

    Words start as the base tokenizer segments them; at each step the adjacent pair of pieces that occurs
    most often inside words is merged everywhere (ties go to the first pair in sorted order, so the result
    is deterministic). A pair that would make an existing token is never merged: the base merges, which come
    first, decide where those tokens appear. Two pairs may make the same new token (two merge rules, one
    token). Stops early when no pair occurs `MIN_COUNT` times.
    """
    logger.info("counting the words of %d documents", len(texts))
    with Progress("counting words", len(texts), "documents", logger=logger) as progress:
        counts = word_counts(tokenizer, texts, progress)
    logger.info("corpus: %d distinct words, %d word occurrences; learning up to %d merges", len(counts),
                counts.total(), num_tokens)
    with Progress("learning merges", num_tokens, "tokens", logger=logger) as progress:
        merges = _learn_merges(tokenizer, counts, num_tokens, progress)
    return merges


def _learn_merges(tokenizer: PreTrainedTokenizerBase, counts: Counter[str], num_tokens: int,
                  progress: Progress) -> list[Merge]:
    """`learn_merges` on the corpus' word counts; each new token counted in `progress`."""
    backend = tokenizer.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=True)
    words = [[t.value for t in backend.model.tokenize(w)] for w in counts]
    freqs = list(counts.values())

    def mergeable(pair: tuple[str, str]) -> bool:
        left, right = pair
        return not (right.startswith("\u2581") or left + right in vocab
                    or BYTE_TOKEN.fullmatch(left) or BYTE_TOKEN.fullmatch(right))

    pair_counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:], strict=False):
            if mergeable(pair):
                pair_counts[pair] += freqs[i]
                where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[Merge] = []
    new_tokens: set[str] = set()
    while heap:
        negative, pair = heapq.heappop(heap)
        if -negative != pair_counts.get(pair, 0):
            continue  # a stale entry: the pair's count changed since it was pushed
        token = pair[0] + pair[1]
        if -negative < MIN_COUNT or (token not in new_tokens and len(new_tokens) == num_tokens):
            break
        merges.append(Merge(pair[0], pair[1], token, -negative))
        if token not in new_tokens:
            progress.update()
        new_tokens.add(token)
        changed: set[tuple[str, str]] = set()
        for i in where.pop(pair):
            word = words[i]
            for old in zip(word, word[1:], strict=False):
                if mergeable(old):
                    pair_counts[old] -= freqs[i]
                    where[old].discard(i)
                    changed.add(old)
            words[i] = word = merge_word(word, pair, token)
            for new in zip(word, word[1:], strict=False):
                if mergeable(new):
                    pair_counts[new] += freqs[i]
                    where[new].add(i)
                    changed.add(new)
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                pair_counts.pop(p)
                where.pop(p, None)
    return merges


def merge_word(word: list[str], pair: tuple[str, str], token: str) -> list[str]:
    """`word` with every occurrence of `pair`, left to right, replaced by `token` (as BPE applies a merge)."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(token)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def base_pieces(merges: list[Merge]) -> dict[str, list[str]]:
    """For each new token, the base tokens it is made of (what its embeddings are initialised from)."""
    pieces: dict[str, list[str]] = {}
    for m in merges:
        pieces[m.token] = pieces.get(m.left, [m.left]) + pieces.get(m.right, [m.right])
    return pieces


# ----------------------------------------------------------------------------------------------------------
# Writing the extended tokenizer


def save_extended_tokenizer(tokenizer: PreTrainedTokenizerBase, merges: list[Merge], tokens: list[str],
                            out_dir: Path) -> list[int]:
    """Save `tokenizer` with the new `tokens` and `merges` in its tokenizer.json; the tokens' ids, in order.

    New ids follow every existing id (added tokens included), so no old id moves. The merges are appended,
    ranked after all the old ones. Other vocabulary files that would contradict tokenizer.json are removed.
    """
    tokenizer.save_pretrained(out_dir)
    for stale in ("tokenizer.model", "vocab.json", "merges.txt"):
        (out_dir / stale).unlink(missing_ok=True)
    path = out_dir / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data["model"]
    taken = list(model["vocab"].values()) + [t["id"] for t in data.get("added_tokens", [])]
    first = max(taken) + 1
    new_ids = list(range(first, first + len(tokens)))
    for token, i in zip(tokens, new_ids, strict=True):
        model["vocab"][token] = i
    as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
    model["merges"] += [f"{m.left} {m.right}" if as_strings else [m.left, m.right] for m in merges]
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return new_ids


def check_ids(tokenizer: PreTrainedTokenizerBase, tokens: list[str], new_ids: list[int]) -> None:
    """The saved tokenizer, loaded back as users will load it, has every new token at its id."""
    got = tokenizer.convert_tokens_to_ids(tokens)
    if got != new_ids:
        raise IgeaError(f"the extended tokenizer ({type(tokenizer).__name__}) did not keep the new tokens' ids; "
                        "this tokenizer class cannot be extended")


# ----------------------------------------------------------------------------------------------------------
# Measuring


def count_tokens(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> int:
    """Tokens in `texts`, special tokens left out."""
    total = 0
    for start in range(0, len(texts), 256):
        batch = list(texts[start:start + 256])
        total += sum(map(len, tokenizer(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]))
    return total


def fertility(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> float:
    """Tokens per word of `texts` (words: whitespace-separated), special tokens left out."""
    return count_tokens(tokenizer, texts) / max(1, sum(len(t.split()) for t in texts))


@torch.inference_mode()
def bits_per_byte(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                  label: str | None = None) -> float:
    """Total negative log-likelihood of `texts` in bits over their UTF-8 bytes: comparable across tokenizers.

    Each text is scored on its own after an EOS token (the boundary igea trains with), every one of its
    tokens predicted. A text longer than the model's context is scored in overlapping windows, each token
    seeing at least half a context of history. With a `label`, the work says when it starts, how far it is
    and when it ends (igea.progress).
    """
    model.eval()
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    nll, size = 0.0, 0
    if label:
        logger.info("%s: scoring %d documents", label, len(texts))
    with Progress(label, len(texts), "documents", logger=logger) if label else nullcontext() as progress:
        for text in texts:
            ids = [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
            size += len(text.encode("utf-8"))
            done = 1  # ids[0] is context only
            while done < len(ids):
                end = min(len(ids), done + (context - 1 if done == 1 else context // 2))
                start = max(0, end - context)
                window = torch.tensor([ids[start:end]], device=model.device)
                logits = model(window, use_cache=False).logits[0, done - start - 1:end - start - 1].float()
                nll += torch.nn.functional.cross_entropy(logits, window[0, done - start:], reduction="sum").item()
                done = end
            if progress is not None:
                progress.update()
    return nll / math.log(2) / max(size, 1)


def compare(before: float, after: float) -> dict[str, float]:
    """Before, after and the relative change (after / before - 1)."""
    return {"before": before, "after": after, "change": after / before - 1 if before else math.nan}


# ----------------------------------------------------------------------------------------------------------
# Corpora


def read_texts(paths: str | list[str], key: str, d: DataConfig | None = None,
               max_documents: int | None = None) -> list[str]:
    """The cleaned documents of local files, globs, directories or a hub dataset, read as `data:` reads them.

    `d` gives the reading settings (text column, minimum length, ...); `key` names the setting in errors.
    """
    resolve_local_files(paths, key)
    d = DataConfig(**{**(vars(d) if d else {}), "path": paths, "sources": [], "max_documents": max_documents})
    return _texts(clean_corpus(load_corpus(d, streaming=False), d))


def hold_out(texts: list[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """A seeded `HELDOUT_FRACTION` of the documents (at least one) kept apart to measure on."""
    if len(texts) < 2:
        return texts, []
    count = max(1, round(len(texts) * HELDOUT_FRACTION))
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    return [texts[i] for i in sorted(order[count:])], [texts[i] for i in sorted(order[:count])]


def run_texts(cfg: IgeaConfig) -> tuple[list[str], list[str]]:
    """The documents a run's vocabulary is learned on, and those its fertility is measured on.

    With `corpus` set: that corpus, less a held-out share. Without it: the run's own training documents (the
    same split training makes), and its validation documents as held-out text.
    """
    ext, d = cfg.model.extend_vocabulary, cfg.data
    if ext.corpus is not None:
        return hold_out(read_texts(ext.corpus, "model.extend_vocabulary.corpus", d, ext.max_documents))
    limit = ext.max_documents if ext.max_documents is not None else d.max_documents
    d = DataConfig(**{**vars(d), "max_documents": limit})
    source = SourceConfig(path=d.path, text_column=d.text_column, name=d.name, split=d.split)
    documents = clean_corpus(load_corpus(d, source), d)
    if isinstance(d.validation_path, (str, list)):  # it replaces the split (named sets add to it)
        return _texts(documents), read_texts(d.validation_path, "data.validation_path", d)
    seed = d.seed if d.seed is not None else cfg.training.get("seed", 42)
    if d.streaming:  # the first documents, as the streamed run holds them out
        parts = split_corpus(documents, d.validation_split, seed)
        return _texts(parts["train"]), _texts(parts["validation"]) if "validation" in parts else []
    texts = _texts(documents)
    held = HeldOut(d.validation_split, seed).mask(len(texts))  # the very split prepare_dataset makes
    return [t for t, h in zip(texts, held, strict=True) if not h], [t for t, h in zip(texts, held, strict=True) if h]


def _texts(dataset) -> list[str]:
    return [row["text"] for row in dataset]


# ----------------------------------------------------------------------------------------------------------
# model.extend_vocabulary in a run


def ensure_extended_model(cfg: IgeaConfig) -> Path:
    """The run's extended base model, `<output_dir>/base-model-extended`, built on first use.

    One that is already there is reused if it was built from the same base model, corpus and token count.
    """
    from accelerate import PartialState

    ext = cfg.model.extend_vocabulary
    check_device(ext.device, f"{ext.KEY}.device")  # before the corpus is read: the error names the config's key
    target = cfg.output_dir / EXTENDED_DIR
    source = configured_model_path(cfg)
    settings = {"base_model": source, "num_tokens": ext.num_tokens, "corpus": ext.corpus}
    with PartialState().main_process_first():
        if (target / REPORT).is_file():
            report = json.loads((target / REPORT).read_text(encoding="utf-8"))
            asked = report.get("fit", {}).get("asked")  # None: the default, whatever it came to on that device
            if {key: report.get(key) for key in settings} == settings and asked == ext.fit_documents:
                return target
            if PartialState().is_main_process:
                logger.info("%s was built with other model.extend_vocabulary settings: building it again", target)
                shutil.rmtree(target)
        if cfg.model.tiny is not None:
            ensure_tiny_model(cfg)
        texts, heldout = run_texts(cfg)
        logger.info("extending the vocabulary of %s with %d tokens learned on %d documents", source,
                    ext.num_tokens, len(texts))
        extend_vocabulary(source, texts, ext.num_tokens, target, heldout_texts=heldout, model_config=cfg.model,
                          corpus=ext.corpus, fit_documents=ext.fit_documents, device=ext.device)
    return target
