"""The YAML run config: sections, validation messages, extends chains and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from merit_jax.runconfig import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    describe,
    load_config,
    merge_overrides,
)

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"

MINIMAL = """
data:
  mixture:
    datasets:
      - bigbench:gem/e2e_nlg
      - bigbench:arithmetic/3_digit_addition
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def minimal_dict(**sections) -> dict:
    data = {"data": {"mixture": {"datasets": ["bigbench:gem/e2e_nlg", "bigbench:word_sorting"]}}}
    data.update(sections)
    return data


def test_minimal_config_defaults(tmp_path):
    config = load_config(write(tmp_path / "run.yaml", MINIMAL))
    assert isinstance(config, RunConfig)
    assert config.model.ref == "smollm2-135m-instruct"
    assert config.plan.pca_dim == 2
    assert config.plan.num_groups == 4
    assert config.plan.trainable == (".*",)
    assert [s.task_name for s in config.data.mixture.datasets] == [
        "gem/e2e_nlg",
        "arithmetic/3_digit_addition",
    ]
    assert config.plan_dir == Path("runs/default/plan")


def test_quickstart_config_is_valid():
    config = load_config(CONFIGS / "quickstart.yaml")
    names = [spec.task_name for spec in config.data.mixture.datasets]
    assert 24 <= len(names) <= 32
    assert 6 <= len(config.data.eval_tasks) <= 10
    assert not set(names) & set(config.data.eval_tasks)
    assert all(spec.budget.tokens is not None for spec in config.data.mixture.datasets)
    assert all(spec.held_out > 0 for spec in config.data.mixture.datasets)
    assert config.plan.seq_len >= config.data.max_length


def test_quickstart_train_section_is_a_train_config():
    from merit_jax.train.config import TrainConfig

    config = load_config(CONFIGS / "quickstart.yaml")
    train = TrainConfig.from_dict(config.train)
    assert train.seq_len == config.data.max_length


@pytest.mark.parametrize("name", ["qwen2.5-3b-flan.yaml", "qwen2.5-vl-3b-vision-flan.yaml"])
def test_presets_validate(name):
    config = load_config(CONFIGS / "presets" / name)
    assert config.model.ref.startswith("Qwen/")
    assert config.data.mixture.datasets[0].source == "hf"
    text = describe(config)
    assert config.model.ref in text
    assert "K=" in text


def test_unknown_top_level_key_lists_valid_keys(tmp_path):
    path = write(tmp_path / "run.yaml", MINIMAL + "planner: {}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "planner" in message
    assert "valid keys" in message
    assert "plan" in message
    assert str(path) in message


@pytest.mark.parametrize(
    ("section", "values", "fragments"),
    [
        ("plan", {"pca_dim": 0}, ["plan.pca_dim=0", ">= 1"]),
        ("plan", {"partitioner": "spectral"}, ["plan.partitioner='spectral'", "merit"]),
        ("plan", {"calibration": 8}, ["unknown key", "calibration_size"]),
        ("plan", {"trainable": ["layers/(attn"]}, ["plan.trainable[0]", "regular expression"]),
        ("plan", {"trainable": "attn"}, ["plan.trainable", "list"]),
        ("plan", {"sketch_dim": 0}, ["plan.sketch_dim=0"]),
        ("plan", {"packing": "yes"}, ["plan.packing", "true or false"]),
        ("model", {"compute_dtype": "fp8"}, ["model.compute_dtype='fp8'", "bfloat16"]),
        ("model", {"dtype": "float32"}, ["unknown key", "param_dtype"]),
        ("model", {"ref": ""}, ["model.ref", "registry name"]),
    ],
)
def test_invalid_field_names_field_and_fix(section, values, fragments):
    with pytest.raises(ConfigError) as error:
        config_from_dict(minimal_dict(**{section: values}), where="run.yaml")
    message = str(error.value)
    assert message.startswith("run.yaml")
    for fragment in fragments:
        assert fragment in message


def test_seq_len_shorter_than_max_length_raises():
    data = minimal_dict(plan={"seq_len": 256})
    data["data"]["max_length"] = 512
    with pytest.raises(ConfigError, match=r"plan.seq_len=256 .* data.max_length=512"):
        config_from_dict(data)


def test_missing_mixture_raises_with_example():
    with pytest.raises(ConfigError, match="data.mixture is missing"):
        config_from_dict({"data": {"eval_tasks": ["navigate"]}})


def test_mixture_errors_name_the_config():
    data = {"data": {"mixture": {"datasets": [{"source": "bigbench", "nme": "x"}]}}}
    with pytest.raises(ConfigError) as error:
        config_from_dict(data, where="run.yaml")
    assert "run.yaml: data.mixture.datasets[0]" in str(error.value)
    assert "nme" in str(error.value)


def test_eval_task_also_in_training_raises():
    data = minimal_dict()
    data["data"]["eval_tasks"] = ["navigate", "word_sorting"]
    with pytest.raises(ConfigError, match=r"\['word_sorting'\].*share no task"):
        config_from_dict(data)


def test_duplicate_eval_tasks_raise():
    data = minimal_dict()
    data["data"]["eval_tasks"] = ["navigate", "navigate"]
    with pytest.raises(ConfigError, match="more than once"):
        config_from_dict(data)


def test_opaque_sections_are_kept_verbatim():
    train = {"learning_rate": 1e-4, "schedule": {"nested": [1, 2]}}
    config = config_from_dict(minimal_dict(train=train, merge={"operator": "linear"}))
    assert config.train == train
    assert config.merge == {"operator": "linear"}
    assert config.eval == {}
    train["learning_rate"] = 1.0
    assert config.train["learning_rate"] == 1e-4


def test_opaque_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="train must be a mapping"):
        config_from_dict(minimal_dict(train=[1, 2]))


def test_extends_merges_mappings_and_replaces_lists(tmp_path):
    write(
        tmp_path / "presets" / "base.yaml",
        MINIMAL
        + """
seed: 3
plan: {pca_dim: 3, calibration_size: 32, trainable: ['.*']}
train: {learning_rate: 0.001, batch_size: 8}
""",
    )
    child = write(
        tmp_path / "configs" / "child.yaml",
        """
extends: ../presets/base.yaml
plan: {pca_dim: 1, trainable: ['layers/mlp']}
train: {batch_size: 2}
""",
    )
    config = load_config(child)
    assert config.seed == 3
    assert config.plan.pca_dim == 1
    assert config.plan.calibration_size == 32
    assert config.plan.trainable == ("layers/mlp",)
    assert config.train == {"learning_rate": 0.001, "batch_size": 2}
    assert len(config.data.mixture.datasets) == 2


def test_extends_chain_of_three_files(tmp_path):
    write(tmp_path / "a.yaml", MINIMAL + "seed: 1\noutput_dir: runs/a\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\nseed: 2\n")
    c = write(tmp_path / "c.yaml", "extends: b.yaml\nplan: {pca_dim: 1}\n")
    config = load_config(c)
    assert config.seed == 2
    assert config.output_dir == "runs/a"
    assert config.plan.pca_dim == 1


def test_extends_cycle_raises(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_extends_missing_file_names_the_referencing_file(tmp_path):
    child = write(tmp_path / "child.yaml", "extends: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError) as error:
        load_config(child)
    assert "nowhere.yaml" in str(error.value)
    assert str(child) in str(error.value)


def test_unknown_key_in_parent_is_reported_with_its_file(tmp_path):
    parent = write(tmp_path / "parent.yaml", MINIMAL + "sed: 1\n")
    child = write(tmp_path / "child.yaml", "extends: parent.yaml\n")
    with pytest.raises(ConfigError) as error:
        load_config(child)
    assert str(parent) in str(error.value)
    assert "sed" in str(error.value)


def test_invalid_yaml_raises_config_error(tmp_path):
    path = write(tmp_path / "bad.yaml", "data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_overrides_set_nested_values(tmp_path):
    path = write(tmp_path / "run.yaml", MINIMAL)
    config = load_config(
        path, ["plan.calibration_size=4", "plan.trainable=['embed']", "train.lr=0.5", "seed=7"]
    )
    assert config.plan.calibration_size == 4
    assert config.plan.trainable == ("embed",)
    assert config.train == {"lr": 0.5}
    assert config.seed == 7


@pytest.mark.parametrize("override", ["plan.pca_dim", "=3", "plan..pca_dim=3"])
def test_malformed_override_raises(override):
    with pytest.raises(ConfigError, match="override"):
        apply_overrides({}, [override])


def test_override_into_scalar_raises():
    with pytest.raises(ConfigError, match="seed is not a mapping"):
        apply_overrides({"seed": 1}, ["seed.value=2"])


def test_merge_overrides_does_not_modify_inputs():
    base = {"a": {"b": [1], "c": 2}}
    override = {"a": {"b": [3]}}
    merged = merge_overrides(base, override)
    assert merged == {"a": {"b": [3], "c": 2}}
    assert base == {"a": {"b": [1], "c": 2}}


def test_to_dict_round_trips():
    config = config_from_dict(minimal_dict(train={"batch_size": 2}), where="x")
    again = config_from_dict(config.to_dict(), where="x")
    assert again == config


def test_seed_out_of_range_raises():
    with pytest.raises(ConfigError, match=r"seed=-1"):
        config_from_dict(minimal_dict(seed=-1))
