"""`igea merge` / `igea.merge`: a run merged back towards its base, its checkpoints averaged, every point scored on
held-out sets; the ends bit for bit (tied and untied, extended vocabulary, LoRA), memory within a shard, the table,
plot and card, and one-line errors that write nothing."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import igea
from igea.cli import main
from igea.config import TinyModelConfig, config_from_dict
from igea.errors import ConfigError
from igea.merge import PLOT_FILE, RESULTS_FILE, WEIGHTS_INDEX, choose_axes, plan, write_merged
from igea.rundir import dir_contents

from conftest import build_trait_model, config_dict, real_abstracts

GENERAL = Path(igea.__file__).parent / "resources" / "general_italian.txt"


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory's safetensors files (one file or shards)."""
    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            found.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118 (safe_open is no dict)
    return found


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def assert_halfway(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor], run: dict[str, torch.Tensor]):
    assert merged.keys() == run.keys()
    for name, tensor in merged.items():
        expected = base[name].float() * 0.5 + run[name].float() * 0.5
        torch.testing.assert_close(tensor, expected.to(run[name].dtype), rtol=0, atol=1e-7)
    assert any(not torch.equal(base[n], run[n]) for n in run)  # training moved something


@pytest.fixture(scope="module")
def general_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("general") / "general.txt"
    path.write_text("\n".join(GENERAL.read_text(encoding="utf-8").splitlines()[:8]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def biomed_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("biomed") / "biomed.txt"
    path.write_text("\n".join(t.replace("\n", " ") for t in real_abstracts("test", limit=3)) + "\n", encoding="utf-8")
    return path


def train_run(out: Path, model_dir: Path, corpus: Path, general: Path, **sections) -> Path:
    """A short real run (4 steps, checkpoints at 2 and 4) with two held-out sets: 4 documents of its corpus
    (`abstracts`) and `general`."""
    defaults = {"data": {"validation_split": 4, "validation_path": {"general": str(general)}},
                "training": {"max_steps": 4, "save_steps": 2, "eval_steps": 4, "learning_rate": 5e-3},
                "eval": {"before_training": False}}
    for section, values in sections.items():
        defaults[section] = {**defaults.get(section, {}), **values}
    return igea.train(config_from_dict(config_dict(out, model_dir, corpus, **defaults))).output_dir


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, corpus_file, general_file, tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("full") / "run", tiny_model_dir, corpus_file, general_file)


# ----------------------------------------------------------------------------------------------------------
# The weights


def test_alpha_0_is_the_base_1_the_run_and_between_a_linear_interpolation(full_run, tiny_model_dir, tmp_path):
    assert_same(tensors(write_merged(full_run, tmp_path / "zero", 0)), tensors(tiny_model_dir))
    assert_same(tensors(write_merged(full_run, tmp_path / "one", 1.0)), tensors(full_run))
    assert_halfway(tensors(write_merged(full_run, tmp_path / "half", 0.5)), tensors(tiny_model_dir),
                   tensors(full_run))
    card = (tmp_path / "half" / "README.md").read_text(encoding="utf-8")
    assert "(1 - alpha) base + alpha run, with alpha = 0.5" in card and f"`{tiny_model_dir.name}`" in card
    assert str(tiny_model_dir) not in card  # a local path is named by its directory only


def test_checkpoint_average_is_the_mean_of_the_kept_checkpoints(full_run, tmp_path):
    job = plan(full_run, None, [0.5], True, None, None)
    assert [p.name for p in job.points] == ["base", "alpha 0.5", "run", "checkpoint-2", "checkpoint-4", "average"]
    assert [p.same_as for p in job.points] == [None, None, None, None, "run", None]  # the last step's weights
    assert [w.directory.name for w, _ in job.points[-1].mix] == ["checkpoint-2", "checkpoint-4"]  # still averaged
    write_merged(full_run, tmp_path / "avg", "average")
    assert_halfway(tensors(tmp_path / "avg"), tensors(full_run / "checkpoint-2"), tensors(full_run / "checkpoint-4"))
    assert "the average of the checkpoints checkpoint-2, checkpoint-4" in (tmp_path / "avg" / "README.md").read_text()


def test_a_checkpoint_one_byte_off_the_runs_weights_is_scored_as_its_own_point(full_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_run, run, ignore=shutil.ignore_patterns("checkpoint-2"))
    weights = run / "checkpoint-4" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last byte of the last tensor
    weights.write_bytes(bytes(data))
    assert [p.same_as for p in plan(run, None, [], True, None, None).points] == [None, None, None]


@pytest.mark.slow
def test_tied_embeddings_stay_tied(corpus_file, general_file, tmp_path):
    texts = corpus_file.read_text(encoding="utf-8").splitlines()[:200]
    base = build_trait_model("tied", texts, tmp_path / "tied")
    run = train_run(tmp_path / "run", base, corpus_file, general_file)
    zero, one, half = (write_merged(run, tmp_path / name, alpha) for name, alpha in
                       (("zero", 0), ("one", 1), ("half", 0.5)))
    assert "lm_head.weight" not in tensors(run)  # one matrix on disk
    assert_same(tensors(zero), tensors(base))
    assert_same(tensors(one), tensors(run))
    assert_halfway(tensors(half), tensors(base), tensors(run))
    model = AutoModelForCausalLM.from_pretrained(half)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model.lm_head.weight, tensors(half)["model.embed_tokens.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("trait", ["bos", "vocab70k"])
def test_a_bos_adding_tokenizer_and_a_vocabulary_over_65536_come_through_a_merge(trait, corpus_file, tmp_path):
    base = build_trait_model(trait, corpus_file.read_text(encoding="utf-8").splitlines()[:200], tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(torch.randn_like(weight))  # a "run": every weight moved
    model.save_pretrained(tmp_path / "run")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "run")

    out = write_merged(tmp_path / "run", tmp_path / "half", 0.5, base=base)
    assert_halfway(tensors(out), tensors(base), tensors(tmp_path / "run"))
    tokenizer, merged = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    assert len(tokenizer) == merged.config.vocab_size == len(AutoTokenizer.from_pretrained(base))
    ids = tokenizer("Il fegato è", return_tensors="pt")["input_ids"]
    assert (ids[0, 0] == tokenizer.bos_token_id) == (trait == "bos")  # the run's tokenizer, BOS and all
    assert (ids.max() > 65_535) == (trait == "vocab70k")
    assert merged.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


@pytest.mark.slow
def test_extended_vocabulary_merges_with_the_extended_base_or_keeps_the_runs_new_rows(
        tiny_model_dir, corpus_file, general_file, tmp_path):
    run = train_run(tmp_path / "run", tiny_model_dir, corpus_file, general_file,
                    model={"extend_vocabulary": {"num_tokens": 20, "max_documents": 40}})
    extended, base, trained = tensors(run / "base-model-extended"), tensors(tiny_model_dir), tensors(run)
    assert trained["lm_head.weight"].shape[0] == base["lm_head.weight"].shape[0] + 20

    assert_same(tensors(write_merged(run, tmp_path / "zero", 0)), extended)  # the run's own base-model-extended
    assert_same(tensors(write_merged(run, tmp_path / "one", 1)), trained)
    assert_halfway(tensors(write_merged(run, tmp_path / "half", 0.5)), extended, trained)
    assert "so the new tokens' rows are interpolated too" in (tmp_path / "half" / "README.md").read_text()

    original = tensors(write_merged(run, tmp_path / "original", 0, base=tiny_model_dir))  # fewer rows
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(original[name][:512], base[name]) and torch.equal(original[name][512:], trained[name][512:])
    assert all(torch.equal(original[n], base[n]) for n in base if "embed" not in n and "lm_head" not in n)
    assert "20 vocabulary rows more than the base" in (tmp_path / "original" / "README.md").read_text()
    assert len(AutoTokenizer.from_pretrained(tmp_path / "original")) == 532  # the run's tokenizer


@pytest.mark.slow
def test_lora_run_is_merged_by_scaling_its_adapter(tiny_model_dir, corpus_file, general_file, tmp_path):
    from peft import PeftModel

    run = train_run(tmp_path / "run", tiny_model_dir, corpus_file, general_file,
                    peft={"r": 4, "modules_to_save": ["lm_head"]})
    assert [p.name for p in plan(run, None, [0.5], True, None, None).points] == ["base", "alpha 0.5", "run"]
    assert_same(tensors(write_merged(run, tmp_path / "zero", 0)), tensors(tiny_model_dir))
    assert_same(tensors(write_merged(run, tmp_path / "one", 1)), tensors(run))
    half = tensors(write_merged(run, tmp_path / "half", 0.5))

    scaled = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapter")
    for module in scaled.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict):
            module.scaling = {name: value * 0.5 for name, value in module.scaling.items()}
    expected = scaled.merge_and_unload().state_dict()
    base, trained = tensors(tiny_model_dir), tensors(run)
    expected["lm_head.weight"] = (base["lm_head.weight"] + trained["lm_head.weight"]) / 2  # trained in full
    for name, tensor in half.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(half[q_proj], base[q_proj])
    assert "the adapters scaled by alpha" in (tmp_path / "half" / "README.md").read_text()


SHAPE = {"vocab_size": 2000, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 8,
         "num_attention_heads": 4, "num_key_value_heads": 2}
"""35 MB of weights in shards of 4 MB."""

MEASURE = textwrap.dedent("""
    import json, sys
    from igea.merge import write_merged

    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    run, base, out = sys.argv[1:]
    write_merged(run, out + "-warm", 0.5, base=base)  # first use: imports and allocator pools
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
    before = status("VmRSS:")
    write_merged(run, out, 0.5, base=base)
    print(json.dumps({"growth": status("VmHWM:") - before}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-memory reset")
def test_a_sharded_merge_keeps_the_shards_and_memory_within_a_few_shards(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    for name, seed in (("base", 0), ("run", 1)):
        torch.manual_seed(seed)
        MistralForCausalLM(MistralConfig(**SHAPE)).save_pretrained(tmp_path / name, max_shard_size="4MB")
    run_files = sorted(p.name for p in (tmp_path / "run").glob("*.safetensors"))
    largest = max((tmp_path / "run" / name).stat().st_size for name in run_files)
    model_bytes = sum((tmp_path / "run" / name).stat().st_size for name in run_files)
    assert len(run_files) >= 8 and model_bytes > 8 * largest

    env = {**os.environ, "PYTHONPATH": str(Path(igea.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "run"), str(tmp_path / "base"),
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    growth = json.loads(done.stdout.strip().splitlines()[-1])["growth"]
    assert growth < 3 * largest, (growth, largest, model_bytes)  # never two models: 3 x 35 MB

    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == run_files
    assert json.loads((out / WEIGHTS_INDEX).read_text()) == json.loads((tmp_path / "run" / WEIGHTS_INDEX).read_text())
    assert_halfway(tensors(out), tensors(tmp_path / "base"), tensors(tmp_path / "run"))


# ----------------------------------------------------------------------------------------------------------
# igea merge: the table, the plot, the card


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tasks") / "domande.jsonl"
    rows = [{"question": "Il fegato è", "choices": ["un organo", "un osso"], "answer": 0},
            {"question": "La fibrosi cistica è causata da mutazioni del gene", "choices": ["BRCA1", "CFTR"],
             "answer": 1}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_cli_scores_every_point_and_writes_the_picked_one_with_its_card(full_run, tiny_model_dir, questions,
                                                                       tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="igea.merge")
    out = tmp_path / "merged"
    assert main(["merge", str(full_run), "--alphas", "0.5", "--tasks", str(questions), "--pick", "0",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [line.split()[0] for line in printed.splitlines()[1:] if line.strip()][:7]
    assert printed.startswith("point") and "abstracts loss" in printed and "domande acc_norm" in printed
    assert rows[:6] == ["base", "alpha", "run", "checkpoint-2", "checkpoint-4", "average"]
    assert f"merged model (base) written to {out}" in printed
    assert "\ncheckpoint-4 = run " in printed  # the run's own weights, scored once
    assert "5 points to score (base, alpha 0.5, run, checkpoint-2, average)" in caplog.text
    assert f"merging run '{full_run}' back towards its base" in caplog.text and "merge done in " in caplog.text
    assert "checkpoint-4 holds the same weights files as the run: not scored again" in caplog.text

    assert_same(tensors(out), tensors(tiny_model_dir))
    results = json.loads((out / RESULTS_FILE).read_text(encoding="utf-8"))
    points = {p["name"]: p for p in results["points"]}
    after = json.loads((full_run / "metrics.json").read_text(encoding="utf-8"))["after"]
    for name in ("abstracts", "general"):  # the run's own held-out sets, scored as its last evaluation scored them
        assert points["run"]["held_out_sets"][name]["loss"] == pytest.approx(after[f"eval_{name}_loss"], rel=1e-5)
        assert points["checkpoint-4"]["held_out_sets"][name] == points["run"]["held_out_sets"][name]
    assert points["checkpoint-4"]["same_as"] == "run" and "eval_s" not in points["checkpoint-4"]
    assert "same_as" not in points["checkpoint-2"] and points["checkpoint-2"]["eval_s"] > 0
    assert results["domain"] == ["abstracts"] and results["general"] == ["general"]
    assert set(points["alpha 0.5"]["tasks"]["domande"]) >= {"acc", "acc_norm"}
    assert (out / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"| **base** | **0** | **{points['base']['held_out_sets']['abstracts']['loss']:.4f}** |" in card
    assert f"![trade-off]({PLOT_FILE})" in card and "igea merge" in card and "tags:\n- merge" in card
    model = AutoModelForCausalLM.from_pretrained(out)  # a plain model directory
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(out))
    assert main(["generate", str(out), "Il fegato è ", "--max-new-tokens", "3"]) == 0


def test_a_flag_replaces_only_its_own_eval_setting_of_the_run(tiny_model_dir, corpus_file, general_file, questions,
                                                              tmp_path):
    run = train_run(tmp_path / "run", tiny_model_dir, corpus_file, general_file,
                    eval={"tasks": [str(questions)], "limit": 1})
    assert main(["merge", str(run), "--alphas", "", "--no-checkpoints", "--tasks", "--batch-size", "4"]) == 0
    points = {p["name"]: p for p in json.loads((run / RESULTS_FILE).read_text(encoding="utf-8"))["points"]}
    assert points["run"]["tasks"]["domande"]["questions"] == 1  # the run's eval.limit, kept beside --batch-size
    assert main(["merge", str(run), "--alphas", "", "--no-checkpoints", "--tasks", "--limit", "2"]) == 0
    points = {p["name"]: p for p in json.loads((run / RESULTS_FILE).read_text(encoding="utf-8"))["points"]}
    assert points["run"]["tasks"]["domande"]["questions"] == 2


def test_without_output_the_plot_and_results_go_into_the_run(full_run, biomed_file, general_file, capsys):
    assert main(["merge", str(full_run), "--alphas", "", "--no-checkpoints", "--corpus", f"biomed={biomed_file}",
                 "--corpus", f"everyday={general_file}", "--general", "everyday"]) == 0
    printed = capsys.readouterr().out
    assert "biomed loss  everyday loss" in printed and f"trade-off plot: {full_run / PLOT_FILE}" in printed
    results = json.loads((full_run / RESULTS_FILE).read_text(encoding="utf-8"))
    assert [p["name"] for p in results["points"]] == ["base", "run"]
    assert (full_run / PLOT_FILE).is_file() and not dir_contents(full_run).foreign  # --overwrite may remove them
    (full_run / PLOT_FILE).unlink()
    (full_run / RESULTS_FILE).unlink()


def test_the_plots_axes_default_to_the_first_set_and_the_others_and_take_any_set():
    sets = ["biomed", "general", "general_en"]
    assert choose_axes(sets, None, None) == (["biomed"], ["general", "general_en"])
    assert choose_axes(sets, "general_en", None) == (["general_en"], ["biomed", "general"])
    assert choose_axes(sets, "general", "biomed") == (["general"], ["biomed"])
    with pytest.raises(ConfigError, match="domain: no held-out set is named 'bio'; the sets are biomed, general, "):
        choose_axes(sets, "bio", None)


def test_without_matplotlib_the_plot_is_skipped_in_one_line(full_run, biomed_file, general_file, tmp_path,
                                                            monkeypatch, caplog):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    caplog.set_level(logging.INFO, logger="igea.merge")
    results = igea.merge(full_run, alphas=[], checkpoints=False, plot=tmp_path / "plot.png",
                         corpus={"biomed": str(biomed_file), "general": str(general_file)})
    assert results["plot"] is None and not (tmp_path / "plot.png").exists()
    assert (tmp_path / RESULTS_FILE).is_file()
    assert "matplotlib is not installed: no trade-off plot (pip install 'igea[plots]')" in caplog.text


def test_a_plain_model_directory_is_merged_given_its_base_and_sets(other_models, tiny_model_dir, biomed_file,
                                                                   general_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = other_models["plain"]
    before = sorted(os.listdir(plain))
    results = igea.merge(plain, base=tiny_model_dir, alphas=[0.5], checkpoints=False,
                         corpus={"biomed": str(biomed_file), "general": str(general_file)})
    assert [p["name"] for p in results["points"]] == ["base", "alpha 0.5", "run"]
    assert sorted(os.listdir(plain)) == before  # not igea's directory: the plot and results go here instead
    assert results["plot"] == PLOT_FILE and (tmp_path / PLOT_FILE).is_file() and (tmp_path / RESULTS_FILE).is_file()


# ----------------------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2, nothing written


@pytest.fixture(scope="module")
def other_models(tmp_path_factory, corpus_file, full_run) -> dict[str, Path]:
    """A Mistral of another width, a Llama, a plain model directory (no run record) and a run whose base is gone."""
    root = tmp_path_factory.mktemp("others")
    texts = corpus_file.read_text(encoding="utf-8").splitlines()[:100]
    narrow = TinyModelConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=128)
    plain = root / "plain"
    shutil.copytree(full_run, plain, ignore=shutil.ignore_patterns("igea_*", "checkpoint-*"))
    orphan = root / "orphan"
    shutil.copytree(full_run, orphan, ignore=shutil.ignore_patterns("checkpoint-*"))
    record = json.loads((orphan / "igea_run.json").read_text())
    record["config"]["model"]["name_or_path"] = str(root / "deleted-base")
    (orphan / "igea_run.json").write_text(json.dumps(record))
    adapter_only = root / "adapter-only"  # a LoRA run saved with peft.merge: false holds no full weights
    shutil.copytree(full_run, adapter_only, ignore=shutil.ignore_patterns("checkpoint-*", "model*.safetensors"))
    (adapter_only / "adapter_config.json").write_text("{}")
    return {"narrow": igea.build_tiny_model(texts, narrow, root / "narrow"),
            "llama": build_trait_model("tied", texts, root / "llama"), "plain": plain, "orphan": orphan,
            "adapter_only": adapter_only}


@pytest.mark.parametrize(("args", "message"), [
    (["--alphas", "0.5,1.5"], "--alphas: '1.5' is not allowed; it must be a number in [0, 1] (0 is the base, 1 the "
                              "run)"),
    (["--alphas", "half"], "--alphas: 'half' is not allowed; it must be a number in [0, 1]"),
    (["--pick", "nan", "--output", "{tmp}/out"], "--pick: 'nan' is not allowed; it must be a number in [0, 1]"),
    (["--pick", "0.5"], "--pick: a point to write needs both --pick ALPHA (or average) and --output DIR"),
    (["--pick", "0.5", "--output", "{tmp}/out", "--plot", "{tmp}/p.png"],
     "--plot: '{tmp}/p.png' is not allowed with an output directory: the plot and merge.json go into the output "
     "directory ('{tmp}/out'); give one of them"),
    (["--pick", "0.5", "--output", "{run}"], "--output: '{run}' is not an empty directory; igea merge writes only"),
    (["--base", "{narrow}"], "base model '{narrow}' does not match the run: tensor 'lm_head.weight' is [512, 32] "
                             "there, [512, 64] in the run"),
    (["--base", "{llama}"], "base model '{llama}' does not match the run: model_type is 'llama' there, 'mistral' in "
                            "the run; a merge needs the same architecture"),
    (["--base", "{tmp}/nowhere"], "base model '{tmp}/nowhere' does not exist (no such directory)"),
    (["{plain}"], "'{plain}' is not a finished igea run (it has no igea_run.json) and so names no base model; give "
                  "the base with --base MODEL"),
    (["{orphan}"], "the run's base model '{orphans}/deleted-base' does not exist (no such directory); give the base "
                   "with --base MODEL"),
    (["{tmp}/missing-run"], "run '{tmp}/missing-run' does not exist (no such directory)"),
    (["{adapter_only}"], "run '{adapter_only}' holds a LoRA adapter alone (peft.merge: false); igea merge needs the "
                         "merged weights"),
    (["--tasks"], "--tasks: run '{run}' names no benchmark in eval.tasks; name them with --tasks a,b"),
    (["--pick", "average", "--output", "{tmp}/out", "--no-checkpoints"],
     "--pick: 'average' needs two or more checkpoints with full weights"),
])
def test_bad_inputs_are_one_line_exit_2_and_write_nothing(full_run, other_models, tmp_path, capsys, args, message):
    names = {"tmp": tmp_path, "run": full_run, "orphans": other_models["orphan"].parent, **other_models}
    args = [a.format(**names) for a in args]
    command = ["merge", *args] if not args[0].startswith("-") else ["merge", str(full_run), *args]
    before = {p: sorted(os.listdir(p)) for p in (full_run, tmp_path)}
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith("igea: error: " + message.format(**names)) and err.count("\n") == 1, err
    assert {p: sorted(os.listdir(p)) for p in (full_run, tmp_path)} == before
