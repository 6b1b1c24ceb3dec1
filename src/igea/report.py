"""The report of a finished run: `README.md` (a Hugging Face model card) and `curves.png`, in the run dir.

Everything is read back from what the run saved (`igea_run.json`, `metrics.json`, `log_history.json`), so a
card can be written again at any time with `igea card RUN_DIR`. The training results table comes from
transformers' own model-card helpers; the hyperparameter list follows the lines transformers writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers.modelcard import make_markdown_table, parse_log_history

from igea.config import GENERAL_TEXT, HUB_ID, SAMPLE_CORPUS, SHIPPED_CORPORA, looks_local
from igea.errors import IgeaError
from igea.metrics import perplexity
from igea.rundir import RUN_MARKER, write_json_atomic, write_text_atomic
from igea.tasks import markdown_table

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
CURVES_FILE = "curves.png"

RESULT_COLUMNS = ("Training Loss", "Epoch", "Step", "Validation Loss", "Accuracy")
VERSION_NAMES = {"transformers": "Transformers", "torch": "Pytorch", "datasets": "Datasets",
                 "tokenizers": "Tokenizers"}

DEFAULT_RISKS = """\
This model comes from continued pretraining of a base language model on biomedical text. It has not been
instruction-tuned or aligned with human preferences: it only continues the text it is given. Expect that it:

- writes fluent text that can be false: invented findings, doses, statistics and references stated as facts;
- mirrors the biases of its corpus: the diseases, populations and viewpoints that the literature studies most
  are overrepresented, others are missing, and stereotypes found in the sources can be repeated;
- carries the errors of its sources: a machine-translated corpus brings translation mistakes and terms that
  clinicians would not use;
- may produce offensive or otherwise inappropriate text, or repeat personal information seen in training.

It is not a medical device and has not been validated in any clinical setting: never use its output for
diagnosis, treatment or any other decision about a person's health. Fine-tune and evaluate it for a specific
task, with qualified people reviewing its output, before any use beyond research."""


@dataclass
class RunRecord:
    """What a finished run directory says about itself."""

    run_dir: Path
    config: dict[str, Any]
    layout: dict[str, Any]
    versions: dict[str, str]
    metrics: dict[str, Any]
    log_history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def card(self) -> dict[str, Any]:
        return self.config.get("card") or {}

    @property
    def title(self) -> str:
        return self.card.get("title") or self.run_dir.resolve().name


def write_report(run_dir: Path, eval_results: list[Path] | None = None) -> Path:
    """Draw `curves.png` (when matplotlib is installed), write the model card `README.md`; return its path.

    `eval_results`: files `igea eval --output` wrote, whose benchmark scores join the card's evaluation table
    (and the run's metrics.json, so that a later card keeps them).
    """
    run = load_run(Path(run_dir))
    for path in eval_results or []:
        run.metrics["benchmarks"] = add_benchmarks(run, Path(path))
    curves = write_curves(curve_points(run.log_history, run.metrics.get("before")), run.run_dir / CURVES_FILE)
    path = run.run_dir / CARD_FILE
    write_text_atomic(path, render_card(run, curves_drawn=curves is not None))
    logger.info("model card written to %s", path)
    return path


def load_run(run_dir: Path) -> RunRecord:
    """Read a finished run; `metrics.json` wins over the marker's copy (benchmarks are added to it later)."""
    marker = run_dir / RUN_MARKER
    if not marker.is_file():
        raise IgeaError(f"card: '{run_dir}' is not a finished igea run (it has no {RUN_MARKER})")
    record = read_json(marker)
    missing = [key for key in ("config", "layout") if not isinstance(record, dict) or key not in record]
    if missing:
        raise IgeaError(f"card: '{marker}' lacks '{missing[0]}'; it was not written by igea train")
    metrics_file = run_dir / "metrics.json"
    history_file = run_dir / "log_history.json"
    return RunRecord(
        run_dir=run_dir,
        config=record["config"],
        layout=record["layout"],
        versions=record.get("versions", {}),
        metrics=read_json(metrics_file) if metrics_file.is_file() else record.get("metrics", {}),
        log_history=read_json(history_file) if history_file.is_file() else [],
    )


def add_benchmarks(run: RunRecord, results_file: Path) -> dict[str, dict[str, Any]]:
    """Merge the task scores of an `igea eval --output` file (those of its first model, the one evaluated) into
    the run's benchmarks, save them in metrics.json, and return them all."""
    if not results_file.is_file():
        raise IgeaError(f"--eval: '{results_file}' does not exist; igea eval RUN --tasks ... --output FILE writes it")
    results = read_json(results_file)
    models = results.get("models") if isinstance(results, dict) else None
    if not isinstance(models, dict) or not models:
        raise IgeaError(f"--eval: '{results_file}' is not a results file of igea eval --output (it has no 'models')")
    name, entry = next(iter(models.items()))
    tasks = entry.get("tasks") if isinstance(entry, dict) else None
    if not tasks:
        raise IgeaError(f"--eval: '{results_file}' holds no benchmark scores for '{name}'; run igea eval with --tasks")
    scores = {task: {k: v for k, v in score.items() if k != "predictions"} for task, score in tasks.items()}
    lacking = next((f"{task}: '{key}'" for task, score in scores.items()
                    for key in ("acc_norm", "label", "num_fewshot", "domain") if key not in score), None)
    if lacking:
        raise IgeaError(f"--eval: '{results_file}' lacks {lacking}; it was not written by igea eval --output")
    if name not in (run.card.get("repo_id"), str(run.run_dir)) and Path(name).resolve() != run.run_dir.resolve():
        logger.warning("--eval: %s scores '%s', not the run in %s; added to its card all the same", results_file,
                       name, run.run_dir)
    benchmarks = {**(run.metrics.get("benchmarks") or {}), **scores}
    write_json_atomic(run.run_dir / "metrics.json", {**run.metrics, "benchmarks": benchmarks})
    logger.info("benchmarks from %s added to %s: %s", results_file, run.run_dir / "metrics.json", ", ".join(scores))
    return benchmarks


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise IgeaError(f"card: '{path}' is not valid JSON ({err.msg} at line {err.lineno})") from None


# ----------------------------------------------------------------------------------------------------------
# The card


def render_card(run: RunRecord, curves_drawn: bool) -> str:
    """The whole model card as Markdown, front matter first."""
    sections = [
        front_matter(run.config, run.metrics.get("adapter")),
        f"# {run.title}\n\n{description(run)}{tiny_notice(run.config['model'])}",
        how_to_use(run),
        "## Bias, Risks and Limitations\n\n" + (run.card.get("risks") or DEFAULT_RISKS).strip(),
        "## Training and evaluation data\n\n" + data_summary(run),
        "## Training procedure\n\n" + base_model_line(run.config) + adapter_line(run.metrics.get("adapter"))
        + best_line(run.metrics.get("best")),
        "### Training hyperparameters\n\nThe following hyperparameters were used during training:\n\n"
        + "\n".join(hyperparameter_lines(run.config["training"], run.layout)),
        "### Training results\n\n" + results_section(run.log_history, curves_drawn),
        "### Framework versions\n\n" + "\n".join(version_lines(run.versions)),
    ]
    if run.metrics.get("benchmarks"):
        sections.append(benchmark_section(run.metrics["benchmarks"], run.title))
    return "\n\n".join(s.strip() for s in sections) + "\n"


def front_matter(config: dict[str, Any], adapter: dict[str, Any] | None = None) -> str:
    """The card's YAML header, as the hub reads it: only what the run or its `card:` section says (no license or
    tags unless given there); empty lists, and a local base model without `card.base_model`, are left out."""
    card = config.get("card") or {}
    meta = {
        "language": card.get("language") or [],
        "library_name": "peft" if adapter and not adapter["merged"] else "transformers",
        "base_model": hub_base_model(config),
        "datasets": card.get("datasets") or hub_datasets(config["data"]),
        "tags": card.get("tags") or [],
        "license": card.get("license"),
        "pipeline_tag": "text-generation",
    }
    meta = {key: value for key, value in meta.items() if value not in (None, [])}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---"


def hub_base_model(config: dict[str, Any]) -> str | None:
    """The base model's hub id: `card.base_model`, else `model.name_or_path` unless it is a local directory (or
    the model is tiny)."""
    named = (config.get("card") or {}).get("base_model")
    path = config["model"].get("name_or_path")
    return named or (path if path and not looks_local(path) else None)


def data_paths(data: dict[str, Any]) -> list[str]:
    """Every corpus path of the `data:` section: `data.path` or each of `data.sources`."""
    paths = [data["path"]] if data.get("path") else [s["path"] for s in data.get("sources") or []]
    return [p for item in paths for p in ([item] if isinstance(item, str) else item)]


def hub_datasets(data: dict[str, Any]) -> list[str]:
    """The hub dataset ids among the corpora (the hub's `datasets:` list takes nothing else); local files and
    the corpora shipped with igea are described in the card's text."""
    return [p for p in data_paths(data) if p not in SHIPPED_CORPORA and not looks_local(p) and HUB_ID.fullmatch(p)]


def describe_path(path: str) -> str:
    """A corpus as the card names it: a dataset link, or a local file by its name alone (the card is published;
    the directories of the machine it was trained on are nobody's business)."""
    if path == SAMPLE_CORPUS:
        return "the Italian biomedical sample corpus shipped with igea"
    if path == GENERAL_TEXT:
        return "the general (not medical) Italian text shipped with igea"
    if looks_local(path):
        return f"local files (`{Path(path).name}`)"
    return f"[{path}](https://huggingface.co/datasets/{path})"


def describe_base_model(config: dict[str, Any]) -> str:
    tiny = config["model"].get("tiny")
    if tiny:
        return (f"a tiny Mistral built locally by igea ({tiny['num_hidden_layers']} layers, hidden size "
                f"{tiny['hidden_size']}, vocabulary {tiny['vocab_size']}, random initial weights)")
    hub_id = hub_base_model(config)
    if hub_id:
        return f"[{hub_id}](https://huggingface.co/{hub_id})"
    return f"the local model `{Path(config['model']['name_or_path']).name}`"


def tiny_notice(model: dict[str, Any]) -> str:
    if not model.get("tiny"):
        return ""
    return ("\n\n**The base model is a tiny random-weight model built for demos and tests: this run shows "
            "the pipeline at work, it is not a useful language model.**")


def description(run: RunRecord) -> str:
    if run.card.get("description"):
        return run.card["description"].strip()
    corpora = " and ".join(describe_path(p) for p in data_paths(run.config["data"]))
    return (f"{run.title} is a causal language model continually pretrained on {corpora}, "
            f"from {describe_base_model(run.config)}.")


def base_model_line(config: dict[str, Any]) -> str:
    return f"Base model: {describe_base_model(config)}."


def adapter_line(adapter: dict[str, Any] | None) -> str:
    """What a LoRA / DoRA run trained (recorded by igea.lora), or nothing for full training."""
    if not adapter:
        return ""
    modules = ", ".join(adapter["target_modules"])
    in_full = f"; trained in full: {', '.join(adapter['modules_to_save'])}" if adapter["modules_to_save"] else ""
    where = ("The weights here have the adapter merged in; the adapter alone is in `adapter/`." if adapter["merged"]
             else "This directory holds the adapter only: it loads on top of the base model (peft must be installed).")
    return (f"\n\n{adapter['method']} adapters of rank {adapter['r']} (alpha {adapter['alpha']:g}, dropout "
            f"{adapter['dropout']:g}) on {modules}{in_full}. Trainable parameters: {adapter['trainable_parameters']:,} "
            f"({adapter['trainable_share']:.2%} of the base model's {adapter['base_parameters']:,}); the base weights "
            f"stayed frozen. {where}")


def how_to_use(run: RunRecord) -> str:
    """A transformers pipeline snippet that continues the first prompt with the model: from the hub when
    `card.repo_id` says where it is published, else from the run directory, named without the local path."""
    generation = run.config.get("generation") or {}
    prompt = (generation.get("prompts") or ["Il fegato è "])[0]
    max_new_tokens = generation.get("max_new_tokens", 128)
    if run.card.get("repo_id"):
        model_id = f"model_id = {_literal(run.card['repo_id'])}\n"
    else:
        model_id = (f"model_id = {_literal(run.run_dir.resolve().name)}  # this run's directory; once published, "
                    "its hub id (card.repo_id)\n")
    samples = run.metrics.get("samples") or {}
    flaw = degenerate(continuation(samples[prompt], prompt)) if prompt in samples else None
    return (
        "## How to use\n\n"
        "```python\n"
        "import transformers\n\n"
        f"{model_id}"
        "pipeline = transformers.pipeline(\"text-generation\", model=model_id, dtype=\"auto\")\n"
        f"output = pipeline({_literal(prompt)}, max_new_tokens={max_new_tokens})\n"
        "print(output[0][\"generated_text\"])\n"
        f"{'' if flaw else sample_comment(samples, prompt)}"
        "```"
        + (f"\n\nThe sample the run generated for this prompt at its end is not shown as the output: {flaw}, a "
           "degenerate continuation (`metrics.json` keeps it under `samples`)." if flaw else "")
        + chat_template_note(run.run_dir)
    )


def sample_comment(samples: dict[str, str], prompt: str) -> str:
    """`# Output:` lines with the sample the run generated for `prompt` at its end (as the seed card shows)."""
    if prompt not in samples:
        return ""
    text = " ".join(samples[prompt].split())
    return f"# Output (sampled at the end of the run):\n# {_literal(text)}\n"


def continuation(sample: str, prompt: str) -> str:
    """What the model wrote after `prompt` (samples are saved with their prompt)."""
    return sample[len(prompt):] if sample.startswith(prompt) else sample


LONGEST_RUN = 10
"""A character repeated this many times in a row (`1200000000000`) makes a continuation degenerate."""
REPEATED_SHARE = 0.5
"""A phrase of 1-4 words whose repetitions cover this share of a continuation's words makes it degenerate."""


def degenerate(text: str) -> str | None:
    """Why a generated continuation is no example to show (None when it is one): it is empty, it holds a run of
    one character (LONGEST_RUN or more), or one phrase of 1 to 4 words, repeated, makes up REPEATED_SHARE of its
    words or more (`il paziente il paziente il paziente ...`): what greedy decoding of an undertrained model
    produces."""
    words = text.split()
    if not words:
        return "it is empty"
    run = max(re.finditer(r"(\S)\1*", text), key=lambda m: len(m.group(0)))
    if len(run.group(0)) >= LONGEST_RUN:
        return f"it repeats {run.group(1)!r} {len(run.group(0))} times in a row"
    repeated = []  # (share of the words, phrase, times) of each length's most repeated phrase
    for n in range(1, 5):
        phrases = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        if phrases:
            phrase, count = phrases.most_common(1)[0]
            repeated.append((min(count * n / len(words), 1.0), -n, " ".join(phrase), count))
    share, _, phrase, count = max(repeated)  # the phrase that covers most, the shortest of those that cover as much
    if count >= 3 and share >= REPEATED_SHARE:
        return f"{phrase!r} makes up {share:.0%} of it ({count} times)"
    return None


CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def chat_template_note(run_dir: Path) -> str:
    """A line for a run whose tokenizer carries its base model's chat template (an instruct base): the template
    is kept, so that chat prompts are formatted as the base expects, but nothing in continued pretraining trained
    or checked the model's answers in that format."""
    config = run_dir / "tokenizer_config.json"
    in_config = config.is_file() and "chat_template" in json.loads(config.read_text(encoding="utf-8"))
    if not in_config and not any((run_dir / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return ""
    return ("\n\nThe tokenizer keeps the chat template of the base model's tokenizer, so that chat messages are "
            "formatted as the base model expects them. This run continued pretraining on plain text, with no chat "
            "data: the model's replies in that format were neither trained nor evaluated here, and may be worse "
            "than the base model's. Prompt it with text to continue, as above.")


def _literal(text: str) -> str:
    """A double-quoted Python string literal (JSON's escapes are Python's), accents kept as they are."""
    return json.dumps(text, ensure_ascii=False)


def data_summary(run: RunRecord) -> str:
    """Where the corpus came from, its size per split, and the final held-out loss and accuracy."""
    corpora = ", ".join(describe_path(p) for p in data_paths(run.config["data"]))
    block = run.config["data"].get("block_size")
    lines = [f"Corpus: {corpora}, packed into blocks of {block} tokens.", ""]
    held = run.config["data"].get("validation_path")
    if isinstance(held, dict):
        named = "; ".join(f"`{name}`: {', '.join(map(describe_path, [paths] if isinstance(paths, str) else paths))}"
                          for name, paths in held.items())
        lines[-1:] = [f"Held-out sets read from their own files, never trained on: {named}.", ""]
    data = run.metrics.get("data") or {}
    for split in ("train", "validation"):
        if split in data:
            trained = trained_line(data[split], data.get("blocks_trained")) if split == "train" else ""
            lines.append(f"- {split}: {split_summary(data[split], block)}{trained}")
    for name, counts in (data.get("validation_sets") or {}).items():
        lines.append(f"  - {name}: {split_summary(counts, block)}")
    seen = data.get("tokens_seen") or {}
    if seen:
        total = sum(seen.values()) or 1
        shares = ", ".join(f"{name} {tokens:,} ({tokens / total:.1%})" for name, tokens in seen.items())
        lines.append(f"- tokens trained on, per source: {shares}")
    used = data.get("mixture") or {}
    if used:
        lines.append("- blocks trained on, per source: " + "; ".join(
            f"{name}: {u['blocks']:,} blocks, {u['used']:,} used, {u['passes']:.1f} passes" if u.get("blocks")
            else f"{name}: {u['used']:,} used (streamed)" for name, u in used.items()))
    return "\n".join(lines) + "\n\n" + evaluation_summary(run.metrics)


def trained_line(counts: dict[str, Any], trained: int | None) -> str:
    """What the run trained on, beside what the train split holds: the split's blocks are what was available (a
    short run trains on a few of them, a long one goes over them several times)."""
    if trained is None:
        return ""
    available = counts.get("blocks")
    if counts.get("streaming") or not available:
        return f"; trained on {trained:,} blocks"
    epochs = trained / available
    unit = "epoch" if epochs == 1 else "epochs"
    if "sources" in counts:  # the split's blocks are an epoch of the mixture, listed with each source's
        return f"; trained on {trained:,} blocks ({epochs:.3g} {unit} of the mixture)"
    return f" available; trained on {trained:,} blocks ({epochs:.3g} {unit})"


def split_summary(counts: dict[str, Any], block: int | None) -> str:
    """One split's size. Mixed sources: the blocks trained on (whole blocks are mixed, so tokens = blocks x
    block size) and what each source held."""
    if counts.get("streaming"):
        return "streamed from " + ", ".join(counts.get("sources", []))
    if "sources" in counts and block:
        per_source = "; ".join(f"{name}: {c['documents']:,} documents, {c['tokens']:,} tokens"
                               for name, c in counts["sources"].items())
        return (f"{counts['blocks']:,} blocks ({counts['blocks'] * block:,} tokens) mixed from {per_source}")
    return ", ".join(f"{counts[k]:,} {k}" for k in ("documents", "tokens", "blocks") if k in counts)


def evaluation_summary(metrics: dict[str, Any]) -> str:
    after = metrics.get("after")
    if not after:
        return "No held-out set was evaluated (`data.validation_split: 0` and no `data.validation_path`)."
    sets = set_names(after)
    where = f"its {len(sets)} held-out sets together (token-weighted)" if sets else "the evaluation set"
    lines = [f"It achieves the following results on {where}:", ""]
    lines.append(f"- Loss: {after['eval_loss']:.4f}")
    if "eval_accuracy" in after:
        lines.append(f"- Accuracy: {after['eval_accuracy']:.4f}")
    before = metrics.get("before")
    if before:
        accuracy = f" and accuracy {before['eval_accuracy']:.4f}" if "eval_accuracy" in before else ""
        loss = f"{before['eval_loss']:.4f}"
        same = "sets" if sets else "set"
        lines += ["", f"Before training, the base model had loss {loss}{accuracy} on the same {same}."]
    if sets:
        lines += ["", "### Held-out sets", "", "Each set evaluated on its own: what continued pretraining gained on "
                  "its domain and what it cost elsewhere (loss, with perplexity in brackets; lower is better).",
                  "", held_out_table(metrics)]
    return "\n".join(lines)


def set_names(metrics: dict[str, Any]) -> list[str]:
    """The named held-out sets of an evaluation's flat metrics (`eval_<set>_tokens`), in order."""
    return [key[len("eval_"):-len("_tokens")] for key in metrics
            if key.startswith("eval_") and key.endswith("_tokens") and key != "eval_tokens"]


def held_out_table(metrics: dict[str, Any]) -> str:
    """Set | Tokens | Loss before | Loss after | Change, a row per held-out set and one for all of them."""
    before, after = metrics.get("before") or {}, metrics["after"]
    rows = []
    for name in [*set_names(after), None]:
        prefix = f"eval_{name}" if name else "eval"
        row = {"Held-out set": name or "all", "Tokens": f"{after.get(f'{prefix}_tokens', 0):,}"}
        loss = after[f"{prefix}_loss"]
        row["Loss before"] = _loss_cell(before, prefix)
        row["Loss after"] = _loss_cell(after, prefix)
        row["Change"] = f"{loss - before[f'{prefix}_loss']:+.4f}" if f"{prefix}_loss" in before else "-"
        rows.append(row)
    return make_markdown_table(rows).strip()


def _loss_cell(metrics: dict[str, Any], prefix: str) -> str:
    if f"{prefix}_loss" not in metrics:
        return "-"
    loss = metrics[f"{prefix}_loss"]
    return f"{loss:.4f} ({perplexity(loss):,.2f})"


def held_out_summary(metrics: dict[str, Any]) -> str:
    """The held-out results as `igea train` prints them: a line per held-out set (and all of them), before and
    after training side by side; empty when nothing was evaluated."""
    after = metrics.get("after")
    if not after:
        return ""
    before = metrics.get("before") or {}
    sets = set_names(after)
    rows = [(name, f"eval_{name}") for name in sets] + [("all" if sets else "held-out", "eval")]
    width = max(len(name) for name, _ in rows)
    when = "before -> after training" if before else "after training"
    lines = [f"held-out loss, perplexity and next-token accuracy, {when}:"]
    for name, prefix in rows:
        cells = []
        for metric, digits in (("loss", 4), ("perplexity", 2), ("accuracy", 4)):
            value = after.get(f"{prefix}_{metric}")
            if value is None:
                continue
            old = before.get(f"{prefix}_{metric}")
            text = f"{old:.{digits}f} -> {value:.{digits}f}" if old is not None else f"{value:.{digits}f}"
            if metric == "loss" and old is not None:
                text += f" ({value - old:+.4f})"
            cells.append(f"{metric} {text}")
        lines.append(f"  {name:<{width}}  " + "   ".join(cells))
    return "\n".join(lines)


def best_line(best: dict[str, Any] | None) -> str:
    """Which checkpoint `load_best_model_at_end` kept as the final weights, and why."""
    if not best:
        return ""
    which = "highest" if best["greater_is_better"] else "lowest"
    return (f"\n\nThe weights are those of step {best['step']:,} of {best['last_step']:,} (`{best['checkpoint']}`): "
            f"its `{best['metric']}`, {best['value']:.4f}, was the {which} of the run's evaluations "
            "(`training.load_best_model_at_end` with `metric_for_best_model`).")


# ----------------------------------------------------------------------------------------------------------
# Hyperparameters, results, versions, benchmarks


def training_defaults() -> dict[str, Any]:
    """TrainingArguments' field defaults, for the keys a config leaves out (no TrainingArguments is built)."""
    from transformers import TrainingArguments

    fields = dataclasses.fields(TrainingArguments)
    return {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}


def hyperparameter_lines(training: dict[str, Any], layout: dict[str, Any]) -> list[str]:
    """`- name: value` lines by the rules of transformers' model card (optimizer, warmup as the card says).

    Batch sizes, devices and accumulation come from the recorded layout, the rest from `training:`.
    """
    t = {**training_defaults(), **training}
    values: dict[str, Any] = {
        "learning_rate": t["learning_rate"],
        "train_batch_size": layout["per_device_train_batch_size"],
        "eval_batch_size": layout["per_device_eval_batch_size"],
        "seed": t["seed"],
    }
    kind = layout.get("distributed_type") or "not_parallel"
    if kind not in ("not_parallel", "not_distributed"):
        values["distributed_type"] = "multi-GPU" if kind == "distributed" else kind
    if layout["num_devices"] > 1:
        values["num_devices"] = layout["num_devices"]
    if layout["gradient_accumulation_steps"] > 1:
        values["gradient_accumulation_steps"] = layout["gradient_accumulation_steps"]
    if layout["total_train_batch_size"] != values["train_batch_size"]:
        values["total_train_batch_size"] = layout["total_train_batch_size"]
    if layout["total_eval_batch_size"] != values["eval_batch_size"]:
        values["total_eval_batch_size"] = layout["total_eval_batch_size"]
    values["optimizer"] = optimizer_description(t)
    values["lr_scheduler_type"] = getattr(t["lr_scheduler_type"], "value", t["lr_scheduler_type"])
    values.update(warmup_value(t))
    if t["max_steps"] != -1:
        values["training_steps"] = t["max_steps"]
    else:
        epochs = t["num_train_epochs"]
        values["num_epochs"] = int(epochs) if float(epochs).is_integer() else epochs
    if t.get("fp16"):
        values["mixed_precision_training"] = "Native AMP"
    if t.get("label_smoothing_factor"):
        values["label_smoothing_factor"] = t["label_smoothing_factor"]
    return [f"- {name}: {value}" for name, value in values.items()]


def optimizer_description(t: dict[str, Any]) -> str:
    """`Adam with betas=(0.9,0.95) and epsilon=1e-08` for the Adam family, as the published cards say."""
    optim = getattr(t["optim"], "value", t["optim"])
    extra = f" and optimizer_args={t['optim_args']}" if t.get("optim_args") else ""
    if "adam" in optim.lower():
        return f"Adam with betas=({t['adam_beta1']},{t['adam_beta2']}) and epsilon={t['adam_epsilon']}{extra}"
    return f"Use {optim}{extra}"


def warmup_value(t: dict[str, Any]) -> dict[str, Any]:
    """igea's `warmup_ratio`, or transformers 5's `warmup_steps` (a float below 1 is a ratio there)."""
    if t.get("warmup_ratio") is not None:
        return {"lr_scheduler_warmup_ratio": t["warmup_ratio"]} if t["warmup_ratio"] else {}
    steps = t.get("warmup_steps") or 0
    if 0 < steps < 1:
        return {"lr_scheduler_warmup_ratio": steps}
    return {"lr_scheduler_warmup_steps": steps} if steps else {}


def result_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per evaluation during training, as transformers' model card builds them, in the card's columns.

    The training loss of a row is the last one logged at or before its step ("No log" before the first).
    """
    _, lines, _ = parse_log_history(log_history)
    evals = [e for e in log_history if "eval_loss" in e]
    sets = set_names(evals[0]) if evals else []
    tasks = [key[len("eval_"):-len("_acc_norm")] for key in (evals[0] if evals else {}) if key.endswith("_acc_norm")]
    extra = {f"Validation Loss ({name})": f"eval_{name}_loss" for name in sets}
    extra.update({f"Acc Norm ({task})": f"eval_{task}_acc_norm" for task in tasks})

    def hf_name(key: str) -> str:  # how parse_log_history names a metric column
        return " ".join(part.capitalize() for part in key.split("_")[1:])

    rows = [{**{c: line[c] for c in RESULT_COLUMNS if c in line},
             **{column: line[hf_name(key)] for column, key in extra.items() if hf_name(key) in line}}
            for line in lines or []]
    if len(rows) > 1 and not trained_between(log_history, *(row["Step"] for row in rows[-2:])):
        del rows[-2]  # the Trainer's evaluation at the last step, right after one on the cadence: one row, the last
    return rows


def trained_between(log_history: list[dict[str, Any]], first: int, last: int) -> bool:
    """Whether a training loss was logged after step `first` and by step `last`."""
    return any("loss" in entry and first < entry.get("step", 0) <= last for entry in log_history)


def results_section(log_history: list[dict[str, Any]], curves_drawn: bool) -> str:
    rows = result_rows(log_history)
    table = make_markdown_table(rows).strip() if rows else "No evaluation ran during training."
    if curves_drawn:
        curves = f"![Training and validation loss and accuracy]({CURVES_FILE})"
    else:
        curves = "The training curves were not drawn: matplotlib is missing (`pip install igea[plots]`)."
    return f"{table}\n\n{curves}"


def version_lines(versions: dict[str, str]) -> list[str]:
    return [f"- {VERSION_NAMES.get(name, name)} {version}" for name, version in versions.items()]


def benchmark_section(benchmarks: dict[str, dict[str, Any]], title: str) -> str:
    """The card's evaluation table (normalized accuracy per task), as `igea eval` prints it."""
    intro = "Normalized accuracy (acc_norm, as lm-evaluation-harness computes it) on multiple-choice benchmarks."
    return "\n".join(["## Evaluation", "", intro, "", markdown_table({title: benchmarks})])


# ----------------------------------------------------------------------------------------------------------
# Curves


@dataclass
class CurvePoints:
    """(step, value) series: training loss; validation loss and accuracy per held-out set (`validation` for a
    single set; `all` and each set's name with several); each benchmark's acc_norm when scored during training."""

    train_loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    eval_accuracy: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    benchmarks: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def curve_points(log_history: list[dict[str, Any]], before: dict[str, Any] | None = None) -> CurvePoints:
    """The series to plot; the evaluation before training, when there was one, is the point at step 0."""
    points = CurvePoints()
    entries = ([{**before, "step": 0}] if before else []) + log_history
    seen_evals: set[int] = set()
    for entry in entries:
        step = entry.get("step")
        if "loss" in entry:
            points.train_loss.append((step, entry["loss"]))
        if "eval_loss" not in entry or step in seen_evals:  # the final evaluation repeats the last one
            continue
        seen_evals.add(step)
        sets = set_names(entry)
        for name in (["all", *sets] if sets else ["validation"]):
            prefix = f"eval_{name}" if sets and name != "all" else "eval"
            points.eval_loss.setdefault(name, []).append((step, entry[f"{prefix}_loss"]))
            if f"{prefix}_accuracy" in entry:
                points.eval_accuracy.setdefault(name, []).append((step, entry[f"{prefix}_accuracy"]))
        for key, value in entry.items():
            if key.endswith("_acc_norm"):
                points.benchmarks.setdefault(key[len("eval_"):-len("_acc_norm")], []).append((step, value))
    return points


def write_curves(points: CurvePoints, path: Path) -> Path | None:
    """Loss and accuracy against step (a line per held-out set), and each benchmark's acc_norm when it was scored
    during training; drawn with matplotlib's Agg canvas. None when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("matplotlib is not installed: no %s (pip install 'igea[plots]')", CURVES_FILE)
        return None
    panels = 3 if points.benchmarks else 2
    figure = Figure(figsize=(5 * panels, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels)
    _plot(axes[0], points.train_loss, "training", "o-", "C0")
    styles = _set_styles(points.eval_loss)
    for name, series in points.eval_loss.items():
        _plot(axes[0], series, *styles[name])
    for name, series in points.eval_accuracy.items():
        _plot(axes[1], series, *styles[name])
    names = [("loss", axes[0]), ("next-token accuracy", axes[1])]
    if points.benchmarks:
        for i, (task, series) in enumerate(points.benchmarks.items()):
            _plot(axes[2], series, task, "d-", f"C{i % 10}")
        names.append(("benchmark acc_norm", axes[2]))
    for name, ax in names:
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    return path


def _set_styles(series: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    """(label, marker style, colour) of each held-out series: the single set as before, several sets each in a
    colour of their own and the total over them dashed grey."""
    styles = {"validation": ("validation", "s-", "C1"), "all": ("all held-out", "--", "0.45")}
    colours = iter(f"C{i}" for i in (1, 2, 3, 4, 5, 6, 8, 9) * 4)
    for name in series:
        if name not in styles:
            styles[name] = (f"held-out: {name}", "s-", next(colours))
    return styles


def _plot(axes, series: list[tuple[int, float]], label: str, style: str, colour: str) -> None:
    if series:
        steps, values = zip(*series, strict=True)
        axes.plot(steps, values, style, label=label, color=colour, markersize=3)
