"""Keeping what the base knew: a run merged back towards its base model, and its checkpoints averaged, each point
scored on held-out sets, and the chosen point written as a model directory (`igea merge`, `igea.merge`).

The merge is WiSE-FT's linear interpolation of weights, one convention throughout:

    merged = (1 - alpha) * base + alpha * run        alpha 0 is the base, alpha 1 the run

At alpha 0 and 1 the tensors are copied, not computed, so those points are the base and the run bit for bit. A
checkpoint average is the plain mean of the run's kept checkpoints. Every combination is made tensor by tensor
from the safetensors files (each file opened for one tensor at a time): evaluating a point fills one model
object in place, and writing one keeps one output shard in memory and the tensor being computed, never two
models.

A LoRA run with merged weights (`peft.merge: true`) is merged like any run: for each adapted layer,
interpolating the merged weights is adding alpha times the adapter's update to the base (the adapter scaled by
alpha), and `modules_to_save` move alpha of the way from the base. A run with an extended vocabulary is merged
against `base-model-extended` (the base with the new tokens, before training) when it is there; against a base
with fewer rows, the rows of the new tokens are the run's at every alpha.
"""

from __future__ import annotations

import filecmp
import fnmatch
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from igea.config import EvalConfig, config_from_dict, looks_local
from igea.errors import ConfigError, IgeaError, show
from igea.metrics import combined
from igea.progress import Progress, bars_off_in_logs, duration
from igea.rundir import RUN_MARKER, complete_checkpoints, read_json, write_json_atomic, write_text_atomic
from igea.vocab import EXTENDED_DIR

logger = logging.getLogger(__name__)

DEFAULT_ALPHAS = (0.25, 0.5, 0.75)
RESULTS_FILE = "merge.json"
PLOT_FILE = "merge.png"
CARD_FILE = "README.md"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TINY_BASE = "base-model"
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
"""What a merged model directory takes from the run beside its weights: config, generation config, tokenizer."""


# ----------------------------------------------------------------------------------------------------------
# Weights on disk


@dataclass
class Weights:
    """A model directory's safetensors weights, read from their headers only: which file holds each tensor, its
    shape and dtype."""

    directory: Path
    files: dict[str, str]
    shapes: dict[str, list[int]]
    dtypes: dict[str, str]
    sharded: bool

    @classmethod
    def read(cls, directory: Path, what: str) -> Weights:
        index = directory / WEIGHTS_INDEX
        if index.is_file():
            files = dict(read_json(index)["weight_map"])
        elif (directory / WEIGHTS_FILE).is_file():
            with safe_open(str(directory / WEIGHTS_FILE), "pt") as f:
                files = dict.fromkeys(f.keys(), WEIGHTS_FILE)
        elif (directory / "adapter_config.json").is_file():
            raise IgeaError(f"{what} '{directory}' holds a LoRA adapter alone (peft.merge: false); igea merge needs "
                            "the merged weights: train with peft.merge: true, or save the adapter merged into its "
                            "base (peft's merge_and_unload) and merge that directory")
        else:
            raise IgeaError(f"{what} '{directory}' has no safetensors weights ({WEIGHTS_FILE} or {WEIGHTS_INDEX})")
        shapes, dtypes = {}, {}
        for file in sorted(set(files.values())):
            if not (directory / file).is_file():
                raise IgeaError(f"{what} '{directory}' lacks {file}, which {WEIGHTS_INDEX} names")
            with safe_open(str(directory / file), "pt") as f:
                held = f.keys()
                for name in held:
                    if files.get(name) == file:
                        piece = f.get_slice(name)
                        shapes[name], dtypes[name] = list(piece.get_shape()), piece.get_dtype()
        missing = sorted(set(files) - set(shapes))
        if missing:
            raise IgeaError(f"{what} '{directory}': tensor '{missing[0]}' is not in {files[missing[0]]}")
        return cls(directory, files, shapes, dtypes, index.is_file())

    def shards(self) -> dict[str, list[str]]:
        """Each weights file and the tensors it holds, in file order."""
        shards: dict[str, list[str]] = {}
        for name, file in self.files.items():
            shards.setdefault(file, []).append(name)
        return dict(sorted(shards.items()))

    def file_bytes(self) -> dict[str, int]:
        return {file: (self.directory / file).stat().st_size for file in self.shards()}

    def same_files(self, other: Weights) -> bool:
        """Whether both hold the same tensors in byte-identical files (a run's last checkpoint and its final
        weights, usually). Cheap: two files that differ do so in their first tensors' bytes."""
        return self.files == other.files and all(
            filecmp.cmp(self.directory / file, other.directory / file, shallow=False) for file in self.shards())


Mix = list[tuple[Weights, float]]
"""A point's weights: each source with its share (shares sum to 1)."""

TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_tensor(weights: Weights, name: str, rows: slice | None = None) -> torch.Tensor:
    """One tensor (or some of its rows) copied out of its file, which is opened for it alone: its mapped pages
    are released at once, so memory holds what is computed, not the files read."""
    with safe_open(str(weights.directory / weights.files[name]), "pt") as f:
        return f.get_tensor(name) if rows is None else f.get_slice(name)[rows]


def mixed_tensors(mix: Mix, reference: Weights, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors `names` of the weighted sum of `mix`, in the reference's (the run's) dtype, one at a time.

    A source that holds all of a tensor by itself (share 1) is copied, bit for bit. A source with fewer rows than
    the reference (a base without the run's new tokens) takes the reference's rows beyond its own. At most two
    copies of the tensor being computed are in memory (float32 for a weighted sum).
    """

    def full(weights: Weights, name: str) -> torch.Tensor:
        tensor = read_tensor(weights, name)
        rows = reference.shapes[name][0] if reference.shapes[name] else 0
        if weights is not reference and tensor.dim() and tensor.shape[0] < rows:
            tensor = torch.cat([tensor, read_tensor(reference, name, slice(tensor.shape[0], rows)).to(tensor.dtype)])
        return tensor

    for name in names:
        dtype = TORCH_DTYPES.get(reference.dtypes[name])
        if len(mix) == 1 or dtype is None:  # one source, or integers: nothing to interpolate
            tensor = full(mix[0][0] if len(mix) == 1 else reference, name)
        else:
            (first, share), *rest = mix
            tensor = full(first, name).to(torch.float32).mul_(share)  # a fresh copy: computed in place
            for weights, share in rest:
                tensor.add_(full(weights, name).to(torch.float32), alpha=share)
        yield name, tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


def interpolation(base: Weights, run: Weights, alpha: float) -> Mix:
    """(1 - alpha) * base + alpha * run, with the ends as the one source (copied, not computed)."""
    if alpha == 0:
        return [(base, 1.0)]
    if alpha == 1:
        return [(run, 1.0)]
    return [(base, 1.0 - alpha), (run, alpha)]


# ----------------------------------------------------------------------------------------------------------
# The run and its base


@dataclass
class Base:
    """The model a run is merged with: where it is, what the user or the run called it, and what its extra
    vocabulary rows (if any) mean."""

    weights: Weights
    name: str
    note: str = ""


def run_record(run_dir: Path) -> dict[str, Any]:
    """`igea_run.json` of a finished run ({} for a plain model directory)."""
    marker = run_dir / RUN_MARKER
    if not marker.is_file():
        return {}
    try:
        return read_json(marker)
    except (OSError, ValueError) as err:
        raise IgeaError(f"'{marker}' is unreadable: {err}") from None


def find_base(run_dir: Path, record: dict[str, Any], base: str | os.PathLike | None) -> tuple[Path, str, str]:
    """The directory of the base model, its name as shown, and where it came from: `base` when given, else the
    run's `base-model-extended` (an extended vocabulary), else the model its config names (or the tiny model it
    built)."""
    if base is not None:
        return model_directory(str(base), None, "base model"), str(base), "given"
    if (run_dir / EXTENDED_DIR).is_dir():
        return run_dir / EXTENDED_DIR, str(run_dir / EXTENDED_DIR), "extended"
    model = (record.get("config") or {}).get("model") or {}
    if not record:
        raise IgeaError(f"'{run_dir}' is not a finished igea run (it has no {RUN_MARKER}) and so names no base "
                        "model; give the base with --base MODEL")
    if model.get("tiny"):
        path = run_dir / TINY_BASE
        if not path.is_dir():
            raise IgeaError(f"the base model of run '{run_dir}' (the tiny model igea built in '{path}') is gone; "
                            "give it with --base MODEL")
        return path, str(path), "run"
    name = model.get("name_or_path")
    if not name:
        raise IgeaError(f"run '{run_dir}' names no base model in {RUN_MARKER}; give it with --base MODEL")
    return model_directory(name, model.get("revision"), "the run's base model"), name, "run"


def model_directory(name: str, revision: str | None, what: str) -> Path:
    """A local model directory, or the local snapshot of a hub model's config and safetensors weights."""
    if Path(name).is_dir():
        return Path(name)
    if looks_local(name):
        raise IgeaError(f"{what} '{name}' does not exist (no such directory); give the base with --base MODEL")
    from huggingface_hub import snapshot_download

    from igea.hub import hub_reachable

    offline = not hub_reachable()
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=["*.json", "*.safetensors"],
                                      local_files_only=offline))
    except Exception as err:  # hub errors have many types; each means the same thing here
        if offline:
            raise IgeaError(f"{what} '{name}' cannot be found: it is not a local directory, not in the local cache, "
                            "and the Hugging Face hub is unreachable") from err
        raise IgeaError(f"{what} '{name}' cannot be downloaded: {str(err).strip().splitlines()[0]}") from err


def model_config(directory: Path, what: str) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise IgeaError(f"{what} '{directory}' has no config.json; is it a model directory?")
    return read_json(path)


def check_base(run: Weights, base: Weights, run_config: dict[str, Any], base_config: dict[str, Any],
               base_name: str) -> int:
    """Refuse a base of another architecture or shapes, in one line; return how many vocabulary rows the run has
    beyond the base's (0 unless the run's vocabulary was extended and the base is the original model)."""
    for key in ("model_type", "architectures"):
        if run_config.get(key) != base_config.get(key):
            raise IgeaError(f"base model '{base_name}' does not match the run: {key} is {show(base_config.get(key))} "
                            f"there, {show(run_config.get(key))} in the run; a merge needs the same architecture")
    only_run, only_base = sorted(set(run.shapes) - set(base.shapes)), sorted(set(base.shapes) - set(run.shapes))
    if only_run or only_base:
        name, where = (only_run[0], "the run has it, the base not") if only_run else (only_base[0], "the base has "
                                                                                      "it, the run not")
        tied = " (tied embeddings in one of them only?)" if "lm_head" in name else ""
        raise IgeaError(f"base model '{base_name}' does not match the run: tensor '{name}': {where}{tied}")
    run_rows, base_rows = run_config.get("vocab_size"), base_config.get("vocab_size")
    for name, shape in run.shapes.items():
        other = base.shapes[name]
        extended = (base_rows is not None and run_rows is not None and base_rows < run_rows and len(shape) == 2
                    and other == [base_rows, shape[1]] and shape[0] == run_rows)
        if other != shape and not extended:
            raise IgeaError(f"base model '{base_name}' does not match the run: tensor '{name}' is {other} there, "
                            f"{shape} in the run")
    return run_rows - base_rows if run_rows and base_rows and run_rows > base_rows else 0


def resolve_base(run_dir: Path, run: Weights, record: dict[str, Any], base: str | os.PathLike | None) -> Base:
    directory, name, origin = find_base(run_dir, record, base)
    weights = Weights.read(directory, "base model")
    new_rows = check_base(run, weights, model_config(run_dir, "run"), model_config(directory, "base model"), name)
    notes = []
    if origin == "extended":
        notes.append(f"The run's vocabulary was extended: it is merged with `{EXTENDED_DIR}`, the base model with "
                     "the new tokens before training, so the new tokens' rows are interpolated too.")
    if new_rows:
        notes.append(f"The run has {new_rows:,} vocabulary rows more than the base (new tokens): those rows are the "
                     "run's at every alpha, the base included.")
    return Base(weights, name, " ".join(notes))


def adapter_note(record: dict[str, Any]) -> str:
    adapter = (record.get("metrics") or {}).get("adapter")
    if not adapter:
        return ""
    if adapter.get("method") == "DoRA":
        return ("The run trained DoRA adapters; its merged weights are interpolated with the base (for DoRA this "
                "is not the adapter scaled by alpha).")
    in_full = adapter.get("modules_to_save") or []
    return (f"The run trained LoRA adapters (rank {adapter.get('r')}); interpolating its merged weights adds alpha "
            "times the adapters' update to the base (the adapters scaled by alpha)"
            + (f" and moves {', '.join(in_full)} (trained in full) alpha of the way" if in_full else "") + ".")


# ----------------------------------------------------------------------------------------------------------
# Points


@dataclass
class Point:
    """One model on the trade-off: the base, a merge, the run, a checkpoint or the checkpoints' average."""

    name: str
    kind: str
    mix: Mix
    alpha: float | None = None
    result: dict[str, Any] = field(default_factory=dict)
    same_as: str | None = None
    """The point whose weights these are, byte for byte (a checkpoint of the run's final step): not scored again."""

    @property
    def label(self) -> str:
        """The name shown in the table and the plot."""
        return f"{self.name} = {self.same_as}" if self.same_as else self.name


def check_alpha(value: Any, what: str = "alpha") -> float:
    """A number in [0, 1] (a string is parsed); anything else is one line."""
    try:
        number = float(value) if isinstance(value, str | int | float) and not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or not math.isfinite(number) or not 0 <= number <= 1:
        raise ConfigError(f"{what}: {show(value)} is not allowed; it must be a number in [0, 1] (0 is the base, "
                          "1 the run)")
    return number


def plan_points(base: Base, run: Weights, alphas: Sequence[float], checkpoints: list[Weights]) -> list[Point]:
    points = [Point("base", "base", interpolation(base.weights, run, 0.0), 0.0)]
    points += [Point(f"alpha {a:g}", "merge", interpolation(base.weights, run, a), a)
               for a in sorted(set(alphas)) if 0 < a < 1]
    points.append(Point("run", "run", interpolation(base.weights, run, 1.0), 1.0))
    points += [Point(c.directory.name, "checkpoint", [(c, 1.0)], same_as="run" if c.same_files(run) else None)
               for c in checkpoints]
    if len(checkpoints) > 1:
        points.append(Point("average", "average", [(c, 1.0 / len(checkpoints)) for c in checkpoints]))
    return points


def run_checkpoints(run_dir: Path, run: Weights) -> list[Weights]:
    """The run's complete checkpoints that hold full weights of the run's shapes (a LoRA run's hold adapters)."""
    found = []
    for folder in complete_checkpoints(run_dir):
        if not (folder / WEIGHTS_FILE).is_file() and not (folder / WEIGHTS_INDEX).is_file():
            logger.info("%s holds no full weights (a LoRA run's checkpoints hold the adapter): not a point",
                        folder.name)
            continue
        weights = Weights.read(folder, "checkpoint")
        if weights.shapes != run.shapes:
            logger.warning("%s has other tensors or shapes than the run's final weights: left out", folder.name)
            continue
        found.append(weights)
    return found


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def load_into(model: PreTrainedModel, mix: Mix, reference: Weights) -> None:
    """Fill `model`'s weights in place with those of `mix`, shard by shard."""
    state = model.state_dict()
    with torch.no_grad():
        for names in reference.shards().values():
            for name, tensor in mixed_tensors(mix, reference, names):
                if name not in state:
                    raise IgeaError(f"tensor '{name}' of the weights files is not a weight of the loaded model; "
                                    "igea merge cannot evaluate this architecture")
                state[name].copy_(tensor)


def run_held_out_blocks(run_dir: Path, record: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The run's own held-out sets, prepared as its training prepared them (the blocks on disk are reused)."""
    from igea.data import prepare_dataset

    config = record.get("config") or {}
    raw = {"model": {"name_or_path": str(run_dir)}, "data": config.get("data") or {},
           "training": config.get("training") or {}}
    try:
        prepared = prepare_dataset(config_from_dict(raw), tokenizer)
    except IgeaError as err:
        raise IgeaError(f"the held-out sets of run '{run_dir}' cannot be prepared again ({err}); name them with "
                        "--corpus NAME=FILES") from err
    if not prepared.validation_sets:
        raise IgeaError(f"run '{run_dir}' has no held-out set (data.validation_split 0, no data.validation_path); "
                        "name the sets with --corpus NAME=FILES")
    return prepared.validation_sets


def corpus_blocks(corpus: Any, run_dir: Path, tokenizer: PreTrainedTokenizerBase, context: int,
                  block_size: int | None) -> dict[str, Any]:
    """`corpus` (files, or named sets) packed as the run packed its text, as `igea eval` does."""
    from igea.evaluate import check_block_fits, check_set_names, held_out_blocks, held_out_sets, warn_if_trained_on

    if isinstance(corpus, dict):
        check_set_names(corpus)
    sets = held_out_sets(corpus, str(run_dir), block_size, context)
    check_block_fits(next(iter(sets.values())).block_size, context, str(run_dir))
    warn_if_trained_on(str(run_dir), sets)
    return {name or "held_out": held_out_blocks(tokenizer, data, name)[0] for name, data in sets.items()}


def evaluate_point(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, blocks: dict[str, Any],
                   tasks: list, eval_config: EvalConfig) -> dict[str, Any]:
    from igea.evaluate import held_out_metrics
    from igea.tasks import run_tasks

    result: dict[str, Any] = {}
    if blocks:
        per_set = {name: held_out_metrics(model, b, eval_config.batch_size, what=f"held-out set '{name}'")
                   for name, b in blocks.items()}
        result["held_out_sets"] = per_set
        result["held_out"] = combined(list(per_set.values()))
    if tasks:
        result["tasks"] = {name: {k: v for k, v in score.items() if k != "predictions"}
                           for name, score in run_tasks(model, tokenizer, tasks, eval_config).items()}
    return result


def axis_loss(result: dict[str, Any], names: list[str]) -> float:
    """The loss of one set, or the token-weighted loss of several."""
    return combined([result["held_out_sets"][n] for n in names])["loss"]


def choose_axes(sets: list[str], domain: str | None, general: str | None) -> tuple[list[str], list[str]]:
    """The sets of each axis: `domain` (default the first set) and `general` (default every other set)."""
    for key, name in (("domain", domain), ("general", general)):
        if name is not None and name not in sets:
            raise ConfigError(f"{key}: no held-out set is named {name!r}; the sets are {', '.join(sets)}")
    first = [domain] if domain is not None else sets[:1]
    rest = [general] if general is not None else [s for s in sets if s not in first]
    return first, rest


# ----------------------------------------------------------------------------------------------------------
# The table, the plot, the card


def table_rows(points: list[Point], sets: list[str], task_names: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["point", "alpha", *(f"{s} loss" for s in sets)]
    header += ["all loss"] if len(sets) > 1 else []
    header += [f"{t} acc_norm" for t in task_names]
    rows = []
    for p in points:
        r = p.result
        cells = [p.label, "" if p.alpha is None else f"{p.alpha:g}"]
        cells += [f"{r['held_out_sets'][s]['loss']:.4f}" for s in sets]
        cells += [f"{r['held_out']['loss']:.4f}"] if len(sets) > 1 else []
        cells += [f"{r['tasks'][t]['acc_norm']:.4f}" for t in task_names]
        rows.append(cells)
    return header, rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths,
                                                                                                     strict=True)))
             for row in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(header: list[str], rows: list[list[str]], bold: str | None = None) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"**{c}**" if row[0] == bold and c else c for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plot(points: list[Point], domain: list[str], general: list[str], path: Path, title: str) -> Path | None:
    """Domain loss (x) against general loss (y): a point per merge and per checkpoint, the merges joined from the
    base to the run. None when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(6, 5), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    xy = {p.name: (axis_loss(p.result, domain), axis_loss(p.result, general)) for p in points}
    path_points = [p for p in points if p.kind in ("base", "merge", "run")]
    ax.plot([xy[p.name][0] for p in path_points], [xy[p.name][1] for p in path_points], "-", color="0.6", zorder=1,
            label="(1 - alpha) base + alpha run")
    styles = {"base": ("s", "C0", 120), "run": ("*", "C3", 220), "merge": ("o", "C1", 50),
              "checkpoint": ("^", "C2", 60), "average": ("D", "C4", 70)}
    shown = set()
    same = "".join(f" = {p.name}" for p in points if p.same_as)  # one marker for the run and its last checkpoint
    for p in (p for p in points if not p.same_as):
        marker, colour, size = styles[p.kind]
        label = {"merge": "merges", "checkpoint": "checkpoints", "average": "checkpoint average",
                 "run": f"run (final){same}"}.get(p.kind, p.kind)
        ax.scatter(*xy[p.name], marker=marker, color=colour, s=size, zorder=2,
                   label=None if label in shown else label)
        shown.add(label)
        below = p.kind in ("checkpoint", "average")  # apart from the merges' labels when they coincide
        ax.annotate(p.name if p.kind != "merge" else f"{p.alpha:g}", xy[p.name], textcoords="offset points",
                    xytext=(6, -11 if below else 4), fontsize="small")
    ax.set_xlabel(f"domain loss ({' + '.join(domain)})")
    ax.set_ylabel(f"general loss ({' + '.join(general)})")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    return path


def shown_name(name: str) -> str:
    """A model as a published card names it: a hub id, or a local directory by its name alone."""
    return Path(name).name if looks_local(name) or Path(name).is_dir() else name


def render_card(results: dict[str, Any], table: str | None, title: str, plot: bool, risks: str) -> str:
    """The merged model's card: how it was made (run, base, alpha or checkpoints), the table of every point
    scored with the picked row in bold, the plot, the command and the risks."""
    import yaml

    picked = results["picked"]
    point = next(p for p in results["points"] if p["name"] == picked)
    run, base = f"`{shown_name(results['run'])}`", f"`{shown_name(results['base_name'])}`"
    if point["kind"] == "average":
        how = (f"the average of the checkpoints {', '.join(results['checkpoints'])} of the run {run} (the mean of "
               "each weight)")
    else:
        how = (f"a linear merge of the run {run} with its base model {base}: every weight is (1 - alpha) base + alpha "
               f"run, with alpha = {point['alpha']:g} (alpha 0 is the base, 1 the run)")
    notes = " ".join(n for n in (results["base_note"], results["adapter_note"]) if n)
    meta = {"language": results.get("language") or [], "library_name": "transformers",
            "base_model": None if looks_local(results["base_name"]) else results["base_name"],
            "tags": ["merge"], "pipeline_tag": "text-generation"}
    meta = {k: v for k, v in meta.items() if v not in (None, [])}
    sections = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---",
        f"# {title}\n\nThis model is {how}, made tensor by tensor by `igea merge`. {notes}".strip(),
        "## How to use\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{title}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{title}")\n```',
    ]
    if table is not None:
        sections.append(
            "## Choosing the trade-off\n\nEvery point scored on the same held-out blocks (next-token loss, lower is "
            f"better); the row in bold is this model. Domain: {', '.join(results['domain'])}; general: "
            f"{', '.join(results['general']) or '-'}.\n\n{table}" + (f"\n\n![trade-off]({PLOT_FILE})" if plot else ""))
    if results.get("command"):
        sections.append(f"## How it was made\n\n```bash\n{results['command']}\n```")
    sections.append("## Bias, Risks and Limitations\n\n" + risks.strip())
    return "\n\n".join(sections) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Writing a point


def check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"output: '{output}' is not an empty directory; igea merge writes only into a new or "
                          "empty one")
    if not output.resolve().parent.is_dir():
        raise ConfigError(f"output: directory '{output.parent}' does not exist; create it first")


def write_point(point: Point, run: Weights, run_dir: Path, staging: Path, output: Path) -> None:
    """The point's weights with the run's sharding (and index), config and tokenizer, into `staging` (renamed to
    `output` once complete)."""
    shards = run.shards()
    sizes = run.file_bytes()
    logger.info("writing %s into %s: %d weights file(s), the largest %.1f MB, tensor by tensor", point.name,
                output, len(shards), max(sizes.values()) / 1e6)
    start = time.monotonic()
    with Progress(f"writing {point.name}", len(shards), "weights files", logger=logger, say_done=False) as progress:
        for file, names in shards.items():
            save_file(dict(mixed_tensors(point.mix, run, names)), str(staging / file), metadata={"format": "pt"})
            progress.update()
    if run.sharded:
        shutil.copyfile(run_dir / WEIGHTS_INDEX, staging / WEIGHTS_INDEX)
    for entry in sorted(os.listdir(run_dir)):
        if any(fnmatch.fnmatchcase(entry, pattern) for pattern in COPIED_FILES) and (run_dir / entry).is_file():
            shutil.copyfile(run_dir / entry, staging / entry)
    logger.info("%s written in %s", point.name, duration(time.monotonic() - start))


def staged(output: Path) -> Path:
    """A fresh staging directory beside `output` (igea's own name: one left by a crash is removed)."""
    staging = output.resolve().parent / f".{output.name}.igea-merge.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


# ----------------------------------------------------------------------------------------------------------
# igea.merge


@dataclass
class Plan:
    """What a merge will compute, checked before anything is loaded or written."""

    run_dir: Path
    record: dict[str, Any]
    run: Weights
    base: Base
    checkpoints: list[Weights]
    points: list[Point]
    picked: Point | None

    def results(self) -> dict[str, Any]:
        """What merge.json and the card say about the run, its base and the points (metrics added later)."""
        config = self.record.get("config") or {}
        return {
            "run": str(self.run_dir), "run_name": self.run_dir.resolve().name,
            "base": str(self.base.weights.directory), "base_name": self.base.name, "base_note": self.base.note,
            "adapter_note": adapter_note(self.record), "alpha": "(1 - alpha) * base + alpha * run",
            "checkpoints": [c.directory.name for c in self.checkpoints],
            "points": [{"name": p.name, "kind": p.kind, "alpha": p.alpha, **p.result}
                       | ({"same_as": p.same_as} if p.same_as else {}) for p in self.points],
            "picked": self.picked.name if self.picked else None,
            "language": (config.get("card") or {}).get("language"),
        }


def plan(run: str | os.PathLike, base: str | os.PathLike | None, alphas: Sequence[Any], checkpoints: bool,
         pick: float | str | None, output: str | os.PathLike | None) -> Plan:
    """Check every input (alphas, pick, output, the run and its base) and list the points; writes nothing."""
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise IgeaError(f"run '{run_dir}' does not exist (no such directory)")
    alphas = [check_alpha(a, "alphas") for a in alphas]
    if (pick is None) != (output is None):
        raise ConfigError("pick: a point to write needs both --pick ALPHA (or average) and --output DIR")
    if pick is not None and pick != "average":
        pick = check_alpha(pick, "pick")
        alphas.append(pick)
    if output is not None:
        check_output(Path(output))
    record = run_record(run_dir)
    run_weights = Weights.read(run_dir, "run")
    base_info = resolve_base(run_dir, run_weights, record, base)
    saved = run_checkpoints(run_dir, run_weights) if checkpoints else []
    points = plan_points(base_info, run_weights, alphas, saved)
    picked = None
    if pick == "average":
        picked = next((p for p in points if p.kind == "average"), None)
        if picked is None:
            raise ConfigError(f"pick: 'average' needs two or more checkpoints with full weights; run '{run_dir}' "
                              f"has {len(saved)}")
    elif pick is not None:
        picked = next(p for p in points if p.alpha == pick)
    return Plan(run_dir, record, run_weights, base_info, saved, points, picked)


def write_merged(run: str | os.PathLike, output: str | os.PathLike, pick: float | str, *,
                 base: str | os.PathLike | None = None) -> Path:
    """The point `pick` ((1 - alpha) base + alpha run for an alpha, or "average": the checkpoints' mean) written into
    `output` (a new or empty directory) without scoring anything: the weights `merge(..., pick=, output=)` writes,
    with a card that says how they were made."""
    job = plan(run, base, [], pick == "average", pick, output)
    results = {**job.results(), "command": None, "domain": [], "general": []}
    write_output(job.points, job.picked, job.run, job.run_dir, Path(output), results, None, job.record)
    return Path(output)


@bars_off_in_logs
def merge(
    run: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    checkpoints: bool = True,
    corpus: Any = None,
    tasks: Sequence[str] | bool | None = None,
    domain: str | None = None,
    general: str | None = None,
    pick: float | str | None = None,
    output: str | os.PathLike | None = None,
    plot: str | os.PathLike | None = None,
    eval_config: EvalConfig | Mapping[str, Any] | None = None,
    block_size: int | None = None,
    device: str | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Merge run `run` back towards its base at each of `alphas` ((1 - alpha) base + alpha run), average its
    checkpoints, score every point on held-out sets, plot the trade-off, and write the point `pick` into `output`.

    `base` overrides the run's own base model (its `base-model-extended`, else the model its config names).
    `corpus` names held-out sets as `igea.evaluate` takes them (default: the run's own held-out sets); `tasks`
    adds benchmarks (True: the run's `eval.tasks`). `domain` and `general` name the sets of the plot's axes
    (default: the first set, and all the others). `pick` is an alpha or "average" (the checkpoint average),
    written with the run's config and tokenizer and a card into `output`, a new or empty directory. The plot
    (`merge.png`) and the results (`merge.json`) go into `output`, else to `plot` (and beside it), else into
    the run directory (the current directory for a plain model directory, which igea does not write into).
    Scoring takes the run's `eval` settings (num_fewshot, limit, batch_size); `eval_config` replaces them all
    (an EvalConfig) or those it names (a mapping, as the command line's flags do).
    Returns what `merge.json` holds: every point's metrics and timings, and what was written.
    """
    start = time.monotonic()
    if plot is not None and output is not None:
        raise ConfigError(f"plot: {show(str(plot))} is not allowed with an output directory: the plot and "
                          f"{RESULTS_FILE} go into the output directory ('{output}'); give one of them")
    job = plan(run, base, alphas, checkpoints, pick, output)
    run_dir, record = job.run_dir, job.record
    if corpus is None and not record:
        raise IgeaError(f"'{run_dir}' is not a finished igea run (no {RUN_MARKER}): name its held-out sets with "
                        "--corpus NAME=FILES")
    config = record.get("config") or {}
    if not isinstance(eval_config, EvalConfig):
        settings = {k: v for k, v in (config.get("eval") or {}).items() if k in ("num_fewshot", "limit", "batch_size")}
        eval_config = EvalConfig(**{**settings, **(eval_config or {})})
    task_names = list((config.get("eval") or {}).get("tasks") or []) if tasks is True else list(tasks or [])
    if tasks is True and not task_names:
        raise ConfigError(f"tasks: run '{run_dir}' names no benchmark in eval.tasks; name them with --tasks a,b")
    from igea.tasks import check_task_names, context_length, load_task

    check_task_names(task_names, key="tasks")
    loaded = [load_task(name, eval_config.num_fewshot, eval_config.limit) for name in task_names]

    from igea.modeling import load_pretrained

    logger.info("merging run '%s' back towards its base '%s': loading the run and its held-out sets, then scoring %d "
                "points%s", run_dir, job.base.name, sum(not p.same_as for p in job.points),
                f", then writing {job.picked.name} into {output}" if job.picked else "")
    model, tokenizer = load_pretrained(str(run_dir), device)
    blocks = (run_held_out_blocks(run_dir, record, tokenizer) if corpus is None
              else corpus_blocks(corpus, run_dir, tokenizer, context_length(model, tokenizer), block_size))
    sets = list(blocks)
    domain_sets, general_sets = choose_axes(sets, domain, general)
    score_points(job.points, model, tokenizer, blocks, loaded, eval_config, job.run)
    del model

    scored_tasks = list(job.points[0].result.get("tasks", {}))  # by the names the tasks give themselves
    header, rows = table_rows(job.points, sets, scored_tasks)
    results = {**job.results(), "sets": sets, "domain": domain_sets, "general": general_sets, "tasks": scored_tasks,
               "table": text_table(header, rows), "output": str(output) if output is not None else None,
               "command": command}
    if output is not None:
        write_output(job.points, job.picked, job.run, run_dir, Path(output), results, (header, rows), record)
    else:
        target = Path(plot) if plot is not None else run_dir / PLOT_FILE if record else Path(PLOT_FILE)
        drawn = draw(job.points, domain_sets, general_sets, target, results["run_name"])
        results["plot"] = str(drawn) if drawn else None
        write_json_atomic(target.parent / RESULTS_FILE, results)
    logger.info("merge done in %s", duration(time.monotonic() - start))
    return results


def score_points(points: list[Point], model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 blocks: dict[str, Any], tasks: list, eval_config: EvalConfig, run: Weights) -> None:
    """Load each point's weights into `model` and score it; timings and metrics go into `point.result`. A point
    with the weights of another (`same_as`) takes that one's metrics, without timings."""
    copies = [p for p in points if p.same_as]
    points = [p for p in points if not p.same_as]
    logger.info("%d points to score (%s) on %d held-out set(s)%s", len(points), ", ".join(p.name for p in points),
                len(blocks), f" and {len(tasks)} benchmark(s)" if tasks else "")
    for copy in copies:
        logger.info("%s holds the same weights files as the %s: not scored again, shown as '%s'", copy.name,
                    copy.same_as, copy.label)
    for i, point in enumerate(points, 1):
        logger.info("point %d/%d: %s: loading its weights", i, len(points), point.name)
        start = time.monotonic()
        load_into(model, point.mix, run)
        loaded_s = time.monotonic() - start
        point.result = evaluate_point(model, tokenizer, blocks, tasks, eval_config)
        point.result.update(merge_s=loaded_s, eval_s=time.monotonic() - start - loaded_s)
        losses = "  ".join(f"{s} {m['loss']:.4f}" for s, m in point.result.get("held_out_sets", {}).items())
        logger.info("point %d/%d: %s: weights in %s, scored in %s: %s", i, len(points), point.name,
                    duration(loaded_s), duration(point.result["eval_s"]), losses)
    for copy in copies:
        copy.result = {k: v for k, v in next(p for p in points if p.name == copy.same_as).result.items()
                       if k not in ("merge_s", "eval_s")}


def draw(points: list[Point], domain: list[str], general: list[str], path: Path, run_name: str) -> Path | None:
    """The trade-off plot, or None with a log line saying why it was not drawn."""
    if not general:
        logger.info("one held-out set only: no trade-off plot (it needs a domain set and a general one)")
        return None
    drawn = write_plot(points, domain, general, path, f"{run_name}: merged back towards its base")
    if drawn is None:
        logger.info("matplotlib is not installed: no trade-off plot (pip install 'igea[plots]')")
    return drawn


def write_output(points: list[Point], picked: Point, run: Weights, run_dir: Path, output: Path,
                 results: dict[str, Any], table: tuple[list[str], list[list[str]]] | None,
                 record: dict[str, Any]) -> None:
    """The picked point as a model directory, with its card, the plot and merge.json (when points were scored),
    staged and renamed into place (nothing is left behind on failure)."""
    from igea.report import DEFAULT_RISKS

    staging = staged(output)
    try:
        write_point(picked, run, run_dir, staging, output)
        drawn = draw(points, results["domain"], results["general"], staging / PLOT_FILE, results["run_name"]) \
            if table is not None else None
        results["plot"] = str(output / PLOT_FILE) if drawn else None
        risks = ((record.get("config") or {}).get("card") or {}).get("risks") or DEFAULT_RISKS
        shown = markdown_table(*table, bold=picked.name) if table is not None else None
        card = render_card(results, shown, output.resolve().name, drawn is not None, risks)
        write_text_atomic(staging / CARD_FILE, card)
        write_json_atomic(staging / RESULTS_FILE, results)
        if output.exists():
            output.rmdir()  # empty: checked before anything was computed
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("merged model written to %s", output)
