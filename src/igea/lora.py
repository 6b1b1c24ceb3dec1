"""LoRA / DoRA continued pretraining through peft: wrap the base model, then save the adapter and merged weights.

A run with a `peft:` section trains low-rank adapters (plus any `modules_to_save` in full) and leaves the base
weights frozen. Its directory stays a plain model directory: the merged weights at the top, which
`igea generate`, `igea eval` and `transformers.pipeline` load unchanged, and the adapter alone in `adapter/`
(`peft.PeftModel.from_pretrained(base_model, "RUN/adapter")`). With `peft.merge: false` the adapter files are at
the top instead, and transformers loads them on top of the base model named in `adapter_config.json`.
Checkpoints hold the adapter only; the Trainer reloads it on `--resume`.

A model whose input embeddings and LM head share one matrix (tied embeddings: SmolLM, Llama-3.2-1B, Qwen2.5,
Gemma) keeps it shared: naming either of the pair in `modules_to_save` trains the one matrix in full, as both,
and the merged model stays tied (peft's `ensure_weight_tying`); `adapter/` holds the trained matrix once (peft would
save it under both names). An adapter on either of the pair (`target_modules`) is refused: peft 0.21 merges it
twice into the shared matrix.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, Trainer

from igea.basemodel import base_model_path
from igea.config import ALL_LINEAR, AdapterConfig, IgeaConfig, looks_local
from igea.errors import ConfigError, IgeaError
from igea.modeling import from_pretrained_or_explain
from igea.progress import human_size

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
"""Where a merged run keeps its adapter alone."""
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def require_peft() -> None:
    """One clear line when the `peft:` section is used without peft installed."""
    if importlib.util.find_spec("peft") is None:
        raise IgeaError('the peft: section needs the peft package: pip install "igea[lora]"')


def check_peft(cfg: IgeaConfig) -> None:
    """Before anything is built or written: peft is installed, and the configured modules exist in the model.

    The modules are checked on an empty (meta-device) copy of a model named by `model.name_or_path`; a tiny
    model does not exist yet and is checked by `apply_lora`.
    """
    require_peft()
    if cfg.model.name_or_path is None:
        return
    config = from_pretrained_or_explain(AutoConfig, cfg.model.name_or_path, cfg.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    wrap(model, cfg.peft)


def apply_lora(model: PreTrainedModel, cfg: IgeaConfig):
    """`model` wrapped in a peft model whose adapters (and `modules_to_save`) are the only trainable parameters."""
    require_peft()
    with torch.random.fork_rng(devices=[]):  # the adapters' initial weights follow training.seed, nothing else
        torch.manual_seed(cfg.training.get("seed", 42))
        peft_model = wrap(model, cfg.peft)
    # the base as a user will find it again (adapter_config.json): a hub id and revision, or an absolute path
    base = cfg.model.name_or_path or base_model_path(cfg)
    adapter_config = peft_model.peft_config["default"]
    adapter_config.base_model_name_or_path = str(Path(base).resolve()) if looks_local(base) else base
    adapter_config.revision = cfg.model.revision
    summary = adapter_summary(peft_model, cfg.peft)
    if summary["tied_embeddings"]:
        logger.info("%s share one matrix in this model (tied embeddings): peft.modules_to_save trains it in full, "
                    "once, as both, and the merged model keeps them tied", " and ".join(summary["tied_embeddings"]))
    logger.info("%s adapters (rank %d) on %s: %s trainable parameters, %.2f%% of the base model's %s",
                summary["method"], summary["r"], ", ".join(summary["target_modules"]),
                f"{summary['trainable_parameters']:,}", 100 * summary["trainable_share"],
                f"{summary['base_parameters']:,}")
    return peft_model


def wrap(model: PreTrainedModel, settings: AdapterConfig):
    """peft's LoRA model around `model`; a module name the model lacks is one ConfigError naming the key."""
    from peft import LoraConfig, get_peft_model

    targets = ALL_LINEAR if settings.target_modules == [ALL_LINEAR] else settings.target_modules
    check_module_names(model, "peft.target_modules", [] if targets == ALL_LINEAR else targets)
    check_module_names(model, "peft.modules_to_save", settings.modules_to_save)
    modules_to_save = list(settings.modules_to_save)  # a copy: peft edits the list it is given
    tied = tied_embeddings(model)
    leaves = [name.rsplit(".", 1)[-1] for name in tied]
    for i, name in enumerate(tied if targets != ALL_LINEAR else ()):
        adapted = [wanted for wanted in targets if matches(name, wanted)]
        if adapted:
            raise ConfigError(
                f"peft.target_modules: {adapted[0]!r} shares its matrix with {leaves[1 - i]!r} in this model (tied "
                "embeddings), and peft merges an adapter there twice; train the pair in full instead: "
                f"peft.modules_to_save: [{', '.join(leaves)}]")
    shared = any(matches(name, wanted) for name in tied for wanted in modules_to_save)
    if shared:  # both of the pair, so that peft ties them whichever one was named
        modules_to_save = [m for m in modules_to_save if not any(matches(n, m) for n in tied)] + list(tied)
    lora_config = LoraConfig(
        task_type="CAUSAL_LM", r=settings.r, lora_alpha=lora_alpha(settings), lora_dropout=settings.dropout,
        target_modules=targets, modules_to_save=modules_to_save or None, use_dora=settings.use_dora,
        ensure_weight_tying=shared,
    )
    try:
        return get_peft_model(model, lora_config)
    except ValueError as err:  # e.g. a named module of a kind peft cannot adapt
        raise ConfigError(f"peft: {str(err).strip().splitlines()[0]}") from None


def lora_alpha(settings: AdapterConfig) -> float:
    """`peft.alpha`, or 2 r when it is not set."""
    return settings.alpha if settings.alpha is not None else 2.0 * settings.r


def check_module_names(model: torch.nn.Module, key: str, names: list[str]) -> None:
    """Each name must be the last part(s) of some module's name, as peft matches them (it ignores unknown
    `modules_to_save` silently)."""
    modules = [name for name, _ in model.named_modules() if name]
    for wanted in names:
        if not any(matches(name, wanted) for name in modules):
            leaves = sorted({name.rsplit(".", 1)[-1] for name in modules})
            close = difflib.get_close_matches(wanted.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(map(repr, close))}?" if close else f"the model has: {', '.join(leaves)}"
            raise ConfigError(f"{key}: no module named {wanted!r} in the model; {hint}")


def matches(module: str, wanted: str) -> bool:
    """Does a `target_modules` / `modules_to_save` entry name this module (its last part(s), as peft matches)?"""
    return module == wanted or module.endswith("." + wanted)


def tied_embeddings(model: torch.nn.Module) -> tuple[str, str] | tuple[()]:
    """The names of the input embeddings and the LM head when they share one matrix, else ()."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or outputs.weight is not inputs.weight:
        return ()
    names = {module: name for name, module in model.named_modules()}
    return names[inputs], names[outputs]


def adapter_summary(peft_model, settings: AdapterConfig) -> dict[str, Any]:
    """What is trained: method, rank, modules, and trainable parameters against the base model's (for the card).

    A matrix that tied embeddings share is counted once, and both of its names are listed as trained in full.
    """
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)  # each shared parameter once
    base = sum(p.numel() for p in peft_model.parameters()) - trainable
    adapter_config = peft_model.peft_config["default"]  # holds the names peft matched (all-linear expanded)
    in_full = list(settings.modules_to_save)
    tied = tied_embeddings(peft_model.get_base_model()) if adapter_config.ensure_weight_tying else ()
    in_full += [name.rsplit(".", 1)[-1] for name in tied if not any(matches(name, m) for m in in_full)]
    return {
        "method": "DoRA" if settings.use_dora else "LoRA",
        "r": settings.r,
        "alpha": lora_alpha(settings),
        "dropout": settings.dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in adapter_config.target_modules}),
        "modules_to_save": in_full,
        "tied_embeddings": [name.rsplit(".", 1)[-1] for name in tied],
        "trainable_parameters": trainable,
        "base_parameters": base,
        "trainable_share": trainable / base,
        "merged": settings.merge,
    }


def save_adapter(trainer: Trainer, settings: AdapterConfig, staging: Path) -> dict[str, Any]:
    """Save the trained adapter into `staging` and, unless `merge` is off, the merged weights beside it.

    Called on every process (the Trainer's save takes part in collectives); the main one rearranges and merges.
    The merge happens in place: the trainer's model is not trained further after this. Returns the summary
    that the run record and the model card show.
    """
    summary = adapter_summary(trainer.model, settings)
    trainer.save_model(str(staging))  # adapter_config.json, adapter_model.safetensors, tokenizer
    if not trainer.is_world_process_zero():
        return summary
    (staging / "README.md").unlink(missing_ok=True)  # peft's blank template; igea writes the run's card
    if settings.merge:
        (staging / ADAPTER_DIR).mkdir(exist_ok=True)
        for name in ADAPTER_FILES:
            os.replace(staging / name, staging / ADAPTER_DIR / name)
        tied = tied_embeddings(trainer.model.get_base_model()) if summary["tied_embeddings"] else ()
        if tied:
            save_tied_matrix_once(staging / ADAPTER_DIR, tied)
        trainer.model.merge_and_unload().save_pretrained(staging)
    return summary


def save_tied_matrix_once(adapter_dir: Path, tied: tuple[str, str]) -> None:
    """Rewrite an adapter whose `modules_to_save` train a tied embedding matrix so that it holds the matrix once.

    peft saves the shared matrix twice, once per name (`embed_tokens` and `lm_head`: 236 MB instead of 123 for a
    135M model), and its loader wants both. Saved once under the input embedding's name, with the pair left out
    of `modules_to_save`, it is what peft's `save_embedding_layers` writes: `PeftModel.from_pretrained(base, dir)`
    loads it into the base model's embedding, which the base's tie shares with the LM head, so the model comes
    back tied and equal to the run's (the adapters train on; the matrix is a base weight there).
    """
    from safetensors.torch import load_file, save_file

    weights_file, config_file = (adapter_dir / name for name in ADAPTER_FILES)
    weights = load_file(weights_file)
    inputs, outputs = (f"base_model.model.{name}.weight" for name in tied)
    if inputs not in weights or outputs not in weights or not torch.equal(weights[inputs], weights[outputs]):
        return  # not the layout this was written for: peft's own format stays
    size = weights_file.stat().st_size
    del weights[outputs]
    save_file(weights, weights_file, metadata={"format": "pt"})
    config = json.loads(config_file.read_text(encoding="utf-8"))
    kept = [m for m in config.get("modules_to_save") or [] if not any(matches(name, m) for name in tied)]
    config.update(modules_to_save=kept or None, ensure_weight_tying=False)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    logger.info("%s/: the tied embedding matrix saved once, as the base model's %s (%s instead of %s)",
                ADAPTER_DIR, tied[0], human_size(weights_file.stat().st_size), human_size(size))
