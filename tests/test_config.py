"""Config loading: typed sections, TrainingArguments pass-through, overrides and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import igea
from igea.cli import main
from igea.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def minimal(tmp_path: Path, extra: str = "") -> Path:
    corpus = tmp_path / "c.txt"
    corpus.write_text("uno\ndue\n", encoding="utf-8")
    return write(tmp_path, f"model:\n  tiny: {{}}\ndata:\n  path: {corpus}\n{extra}")


def test_card_recipe_is_reproduced_line_by_line():
    cfg = load_config(CONFIGS / "igea-1b.yaml")
    t = cfg.training
    assert (t["learning_rate"], t["per_device_train_batch_size"], t["per_device_eval_batch_size"]) == (5e-5, 8, 8)
    assert (t["adam_beta1"], t["adam_beta2"], t["adam_epsilon"], t["weight_decay"]) == (0.9, 0.95, 1e-8, 0.0)
    assert (t["lr_scheduler_type"], t["warmup_ratio"], t["num_train_epochs"], t["seed"]) == ("cosine", 0.02, 1.0, 42)
    assert t["bf16"] is True and t["eval_steps"] == 5000 and t["logging_steps"] == 5000
    assert t["total_train_batch_size"] == 64
    assert cfg.data.block_size == 2048 and cfg.model.name_or_path == "sapienzanlp/Minerva-1B-base-v1.0"
    assert cfg.data.document_boundary == "special_tokens"


@pytest.mark.parametrize("name", ["igea-350m", "igea-1b", "igea-3b", "demo"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.output_dir.name


def test_yaml_numbers_without_dot_are_numbers(tmp_path):
    cfg = load_config(minimal(tmp_path, "training:\n  learning_rate: 5e-5\n"))
    assert cfg.training["learning_rate"] == 5e-5


def test_dotted_overrides(tmp_path):
    cfg = load_config(minimal(tmp_path), ["training.learning_rate=1e-4", "data.block_size=512",
                                          "model.tiny.hidden_size=32", "generation.prompts=[a, b]"])
    assert cfg.training["learning_rate"] == 1e-4
    assert cfg.data.block_size == 512 and cfg.model.tiny.hidden_size == 32
    assert cfg.generation.prompts == ["a", "b"]


def test_any_training_arguments_field_passes_through(tmp_path):
    cfg = load_config(minimal(tmp_path, "training:\n  torch_compile: true\n  dataloader_num_workers: 3\n"))
    assert cfg.training["torch_compile"] is True and cfg.training["dataloader_num_workers"] == 3


def test_output_dir_defaults_to_runs_and_config_name(tmp_path):
    assert load_config(minimal(tmp_path)).output_dir == Path("runs") / "run"


def test_config_round_trips_through_dict(tmp_path):
    cfg = load_config(minimal(tmp_path, "training:\n  learning_rate: 2e-4\n"))
    again = igea.config.config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize(
    ("extra", "overrides", "expected"),
    [
        ("training:\n  learnig_rate: 1.0\n", [], "unknown key 'training.learnig_rate'; did you mean 'learning_rate'"),
        ("datta:\n  x: 1\n", [], "unknown key 'datta'; did you mean 'data'"),
        ("", ["data.blok_size=3"], "unknown key 'data.blok_size'; did you mean 'block_size'"),
        ("training:\n  learning_rate: fast\n", [], "training.learning_rate: expected a number, got 'fast'"),
        ("training:\n  learning_rate: -1\n", [], "training.learning_rate: -1.0 is not allowed; it must be greater"),
        ("training:\n  learning_rate: 0\n", [], "training.learning_rate: 0.0 is not allowed"),
        ("training:\n  warmup_ratio: 1.5\n", [], "training.warmup_ratio: 1.5 is not allowed; it must be in [0, 1)"),
        ("training:\n  bf16: maybe\n", [], "training.bf16: expected true/false, got 'maybe'"),
        ("training:\n  lr_scheduler_type: zigzag\n", [], "training.lr_scheduler_type: 'zigzag' is not allowed"),
        ("", ["data.block_size=1"], "data.block_size: 1 is not allowed"),
        ("", ["data.block_size=big"], "data.block_size: expected an integer, got 'big'"),
        ("", ["data.packing=tight"], "data.packing: 'tight' is not allowed; choose one of blocks, documents"),
        ("", ["data.validation_split=1.5"], "data.validation_split: 1.5 is not allowed"),
        ("", ["model.dtype=float8"], "model.dtype: 'float8' is not allowed"),
        ("", ["generation.top_p=0"], "generation.top_p: 0.0 is not allowed"),
        ("", ["data.path=/nope/missing.txt"], "data.path: no file matches '/nope/missing.txt'"),
        ("", ["model.name_or_path=./no-such-model"], "model: set exactly one of"),
        ("", ["learning_rate=1"], "the key must name a section and a field"),
        ("", ["training.learning_rate"], "expected KEY=VALUE"),
    ],
)
def test_bad_values_give_one_clear_line(tmp_path, extra, overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(minimal(tmp_path, extra), overrides)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_model_dir_is_named(tmp_path):
    path = write(tmp_path, "model:\n  name_or_path: ./no-such-model\ndata:\n  path: org/corpus\n")
    with pytest.raises(ConfigError, match="model.name_or_path: directory './no-such-model' does not exist"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: [unclosed\n", "is not valid YAML at line"),
        ("- a\n- b\n", "must be a mapping of sections, got a list"),
        ("model:\n  tiny: {}\n", "data: set 'data.path'"),
    ],
)
def test_malformed_files(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text))


def test_sources_with_every_entry_commented_out_says_the_list_is_empty(tmp_path, capsys):
    """`sources:` whose entries are all commented out is null in YAML: the error says the list is empty (it
    used to ask for the 'path' of an entry the file does not have); with data.path set, null means no mixture."""
    text = "model:\n  tiny: {}\ndata:\n  sources:\n#    - {path: a.txt, weight: 0.9}\n#    - {path: b.txt}\n"
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert str(err.value).startswith("data.sources is empty: list at least one source")
    assert main(["prepare", str(tmp_path / "run.yaml")]) == 2
    assert capsys.readouterr().err.startswith("igea: error: data.sources is empty: list at least one source")
    cfg = load_config(minimal(tmp_path), ["data.sources=null"])
    assert cfg.data.sources == [] and cfg.data.path is not None
    with pytest.raises(ConfigError, match=r"^data.sources\[0\]: missing required key 'path'$"):
        load_config(minimal(tmp_path), ["data.path=null", "data.sources=[{weight: 1}]"])  # an entry's own error


def test_directory_or_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_quirks_validation_count_and_bare_no(tmp_path):
    cfg = load_config(minimal(tmp_path), ["data.validation_split=8", "training.save_strategy=no",
                                          "training.eval_strategy=no"])
    assert cfg.data.validation_split == 8 and isinstance(cfg.data.validation_split, int)
    assert cfg.training["save_strategy"] == "no" and cfg.training["eval_strategy"] == "no"


def test_a_config_can_be_a_dict_with_overrides_as_one_string(tmp_path):
    raw = {"model": {"tiny": {}}, "data": {"path": "igea:sample"}}
    cfg = load_config(raw, "training.max_steps=5")
    assert cfg.training["max_steps"] == 5 and cfg.output_dir == Path("runs/igea")
    assert raw == {"model": {"tiny": {}}, "data": {"path": "igea:sample"}}  # the caller's dict is not changed
    assert load_config(raw, ["training.max_steps=7", "data.block_size=64"]).data.block_size == 64
    with pytest.raises(ConfigError, match="unknown key 'data.blok_size'; did you mean 'block_size'"):
        load_config({**raw, "data": {"path": "igea:sample", "blok_size": 64}})


def test_sections_built_in_python_are_validated_too():
    from igea.config import DataConfig, GenerationConfig, IgeaConfig, TinyModelConfig

    with pytest.raises(ConfigError, match=r"data.block_size: -5 is not allowed; it must be at least 2"):
        DataConfig(block_size=-5)
    with pytest.raises(ConfigError, match=r"data.block_size: expected an integer, got 'x'"):
        DataConfig(block_size="x")
    with pytest.raises(ConfigError, match=r"generation.temperature: nan is not allowed"):
        GenerationConfig(temperature=float("nan"))
    with pytest.raises(ConfigError, match=r"model.tiny: hidden_size \(65\) must be a multiple"):
        TinyModelConfig(hidden_size=65)
    cfg = IgeaConfig(model={"tiny": {"hidden_size": 32}}, data={"path": "igea:sample"}, training={"output_dir": "x"})
    assert isinstance(cfg.model.tiny, TinyModelConfig) and cfg.model.tiny.hidden_size == 32
    assert cfg.training["lr_scheduler_type"] == "cosine"  # the training section gets its defaults
    with pytest.raises(ConfigError, match="data: set 'data.path'"):
        IgeaConfig(model={"tiny": {}}, data={}, training={"output_dir": "x"})
    with pytest.raises(ConfigError, match="training.learnig_rate"):
        IgeaConfig(model={"tiny": {}}, data={"path": "igea:sample"}, training={"output_dir": "x", "learnig_rate": 1})


def test_presets_ship_inside_the_package_and_load():


    for name in ("demo", "igea-350m", "igea-1b", "igea-3b"):
        path = igea.preset(name)
        assert Path(igea.__file__).parent in path.parents
        load_config(path)
    with pytest.raises(ConfigError, match="preset: 'demo2' is not a config shipped with igea"):
        igea.preset("demo2")
