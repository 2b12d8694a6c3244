"""Configuration: precedence, validation that names the flag, unknown keys, and every shipped recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_cli.config import TrainConfig, build_config, load_yaml
from lora_cli.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_then_yaml_then_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lora:\n  r: 16\n  lora_alpha: 32\ntraining:\n  learning_rate: 3.0e-4\n")
    cfg = build_config(recipe, {"lora.r": 4, "training.seed": None})
    assert cfg.lora.r == 4  # the flag wins
    assert cfg.lora.lora_alpha == 32  # YAML over the default
    assert cfg.training.learning_rate == 3e-4
    assert cfg.training.seed == TrainConfig().training.seed  # an unset flag changes nothing


def test_unknown_yaml_key_suggests_the_right_one(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lora:\n  rank: 16\n")
    with pytest.raises(ConfigError, match=r"unknown key 'lora.rank'.*did you mean 'lora.r'"):
        load_yaml(recipe)


def test_a_misspelt_section_gets_a_suggestion_too(tmp_path):
    recipe = tmp_path / "r.yaml"
    for typo, section in (("modle", "model"), ("trainig", "training"), ("lroa", "lora")):
        recipe.write_text(f"{typo}:\n  seed: 1\n")
        with pytest.raises(ConfigError, match=rf"unknown key '{typo}'.*did you mean '{section}'\?"):
            load_yaml(recipe)


def test_numbers_written_without_a_dot_are_numbers(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("training:\n  learning_rate: 1e-3\nlora:\n  lora_dropout: 5e-2\n")  # YAML 1.1 reads text
    cfg = build_config(recipe)
    assert cfg.training.learning_rate == 1e-3 and cfg.lora.lora_dropout == 0.05


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        build_config(None, {"lora.r": 0, "lora.lora_dropout": 1.5, "model.use_4bit": True, "model.use_8bit": True})
    message = str(info.value)
    assert "--rank" in message and "--dropout" in message and "--use-4bit and --use-8bit" in message
    assert "\n" not in message


def test_wrong_type_in_yaml_names_the_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("training:\n  per_device_train_batch_size: four\n")
    with pytest.raises(ConfigError, match="--batch-size.*must be an integer"):
        build_config(recipe)


def test_malformed_yaml_is_a_config_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lora:\n  r: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(recipe)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_recipe_is_valid_and_starts_with_its_command(path):
    build_config(path)
    assert path.read_text().startswith("# lora train --config configs/" + path.name)


def test_resume_restores_the_recorded_options_and_refuses_others(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    recorded = TrainConfig()
    recorded.model.name, recorded.lora.r, recorded.push_to_hub = "./model", 4, "me/adapter"
    recorded.training.learning_rate = 5e-3
    monkeypatch.chdir(tmp_path)
    record = recorded.to_record()
    assert record["model"]["name"] == str(model.resolve())  # kept absolute: resumable from anywhere
    assert record["data"]["path"] is None  # the embedded dataset, not a path

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = build_config(None, {"training.max_steps": 9}, recorded=record)
    assert (cfg.lora.r, cfg.training.learning_rate, cfg.training.max_steps) == (4, 5e-3, 9)
    assert cfg.push_to_hub is None  # an upload is asked again, not restored
    assert build_config(None, {"model.name": "../model"}, recorded=record).model.name == str(model.resolve())
    with pytest.raises(ConfigError, match=r"drop --rank 8 \(the run has 4\)"):
        build_config(None, {"lora.r": 8}, recorded=record)


def test_a_section_left_empty_is_fine_and_a_section_given_as_a_value_is_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  name: some-model\ntraining:\n#  learning_rate: 1e-3\n")
    assert load_yaml(recipe) == {"model.name": "some-model"}
    recipe.write_text("lora: 8\n")
    with pytest.raises(ConfigError, match=r"'lora' in .*r.yaml must be a section of keys \(such as lora: \{r: ...\}\), "
                                          r"not int 8"):
        load_yaml(recipe)


def test_epochs_on_resume_switch_a_max_steps_run_to_epochs_only_when_they_are_new(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("training:\n  num_train_epochs: 3\n")
    record = build_config(recipe, {"training.max_steps": 500}).to_record()
    # the same recipe given again on resume keeps the run's --max-steps
    assert build_config(recipe, {"resume": True}, recorded=record).training.max_steps == 500
    assert build_config(None, {"training.num_train_epochs": 3}, recorded=record).training.max_steps == 500
    # a new epoch count asks for a length in epochs; with --max-steps too, the steps decide
    assert build_config(None, {"training.num_train_epochs": 5}, recorded=record).training.max_steps == -1
    cfg = build_config(None, {"training.num_train_epochs": 5, "training.max_steps": 800}, recorded=record)
    assert cfg.training.max_steps == 800


def test_a_null_in_yaml_is_the_default_and_the_same_recipe_resumes(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lora:\n  r: null\n  target_modules:\ndata:\n  packing: null\ntraining:\n  learning_rate: null\n"
                      "  max_steps: 4\n")
    cfg = build_config(recipe)
    assert (cfg.lora.r, cfg.lora.target_modules, cfg.data.packing) == (8, "all-linear", True)  # not None, not off
    record = cfg.to_record()
    record["training"]["learning_rate"] = 1e-3  # as train resolves and records it
    # the recipe's `learning_rate: null` (auto) was refused on resume as a change to the recorded 1e-3
    assert build_config(recipe, {"resume": True}, recorded=record).training.learning_rate == 1e-3


@pytest.mark.parametrize("key, value", [("training.learning_rate", "inf"), ("training.warmup_steps", float("inf")),
                                        ("training.num_train_epochs", float("nan")), ("training.weight_decay", "-inf")])
def test_numbers_that_are_not_finite_are_refused(key, value):
    with pytest.raises(ConfigError, match=r"must be a finite number, got"):
        build_config(None, {key: value})


def test_the_seed_must_fit_what_the_random_generators_take_and_text_options_take_no_lists(tmp_path):
    assert build_config(None, {"training.seed": 2**32 - 1}).training.seed == 2**32 - 1
    with pytest.raises(ConfigError, match=r"--seed must be an integer from 0 to 2\*\*32 - 1, got 4294967296"):
        build_config(None, {"training.seed": 2**32})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: [a, b]\n")
    with pytest.raises(ConfigError, match=r"--output-dir must be text, got \['a', 'b'\]"):
        build_config(recipe)
    recipe.write_text("data:\n  path: [x.jsonl, y.jsonl]\n")
    with pytest.raises(ConfigError, match=r"--data must be text \(one file or a folder of files\)"):
        build_config(recipe)


def test_a_runs_manifest_is_a_recipe_less_where_and_how_that_run_was_started(tmp_path):
    recorded = TrainConfig()
    recorded.lora.r, recorded.training.learning_rate, recorded.output_dir = 4, 5e-3, "runs/first"
    recorded.model.int8_backward, recorded.overwrite = True, True
    manifest = tmp_path / "lora_run.json"
    manifest.write_text(json.dumps({"status": "finished", "config": recorded.to_record(), "metrics": {}}))
    cfg = build_config(manifest, {"training.seed": 7})
    assert (cfg.lora.r, cfg.training.learning_rate, cfg.training.seed) == (4, 5e-3, 7)
    assert (cfg.output_dir, cfg.model.int8_backward, cfg.overwrite) == (None, None, False)


def test_flags_turn_off_the_switches_a_recipe_turns_on(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("overwrite: true\nmodel:\n  trust_remote_code: true\n  allow_pickle_weights: true\n")
    assert build_config(recipe).model.trust_remote_code
    cfg = build_config(recipe, {"overwrite": False, "model.trust_remote_code": False,
                                "model.allow_pickle_weights": False})
    assert (cfg.overwrite, cfg.model.trust_remote_code, cfg.model.allow_pickle_weights) == (False, False, False)
