"""Every shipped config and preset composes against its schema (litgpt's test_config_hub idea)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from ftk import schemas

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ["model", "objective", "data", "train", "hardware", "logger"]


def options(group: str):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.fixture(autouse=True)
def _schemas():
    schemas.register()


def _compose(overrides):
    with initialize_config_module(config_module="ftk.configs", version_base=None):
        return compose(config_name="pretrain", overrides=overrides)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "model" and option == "pretrained":
        overrides.append("model.name_or_path=some/model")
    if group == "data" and option != "default":
        overrides.append("data.path=corpus/")
    cfg = _compose(overrides)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("preset", options("recipe"))
def test_every_recipe_preset_composes_and_validates(preset):
    cfg = _compose([f"+recipe={preset}"])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    schemas.validate(cfg)
    # A preset names the shape it trains, and its objective matches the family.
    family = schemas.Family(cfg.model.family)
    objective = schemas.Objective(cfg.objective.name)
    assert (family in (schemas.Family.bert, schemas.Family.roberta)) == (objective is schemas.Objective.mlm)


def test_every_preset_opens_with_its_launch_command():
    for path in (CONFIGS / "recipe").glob("*.yaml"):
        lines = path.read_text().splitlines()
        assert lines[0] == "# @package _global_", path
        assert lines[1].startswith("# ftk pretrain"), path


def test_schema_rejects_what_types_cannot():
    cfg = _compose(["train.seq_len=1024"])  # gpt-tiny has 512 positions
    with pytest.raises(schemas.UsageError, match="max_position_embeddings"):
        schemas.validate(cfg)
    with pytest.raises(schemas.UsageError, match="mask_replace_prob"):
        schemas.validate(_compose(["model=bert-tiny", "objective=mlm", "objective.mask_replace_prob=0.95"]))


def _compose_primary(name, overrides):
    from ftk.evaluation import schema as eval_schema

    eval_schema.register()
    with initialize_config_module(config_module="ftk.configs", version_base=None):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.parametrize("group,option", [(g, o) for g in ("regime", "objective", "train") for o in options(g)])
def test_every_finetune_option_composes_and_validates(group, option):
    cfg = _compose_primary("finetune", [f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    schemas.validate_finetune(cfg)


@pytest.mark.parametrize("option", options("eval"))
def test_every_evaluate_option_composes(option):
    cfg = _compose_primary("evaluate", [f"eval={option}"])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert cfg.eval.kind.value == option


def test_config_options_set_only_what_differs_from_their_schema():
    """Each default is written once, in its schema: an option restating one drifts when the schema changes."""
    import dataclasses

    import yaml

    from ftk import schemas
    from ftk.objectives import table as objectives
    from ftk.regimes import table as regimes

    groups = {"model": schemas.ModelConfig, "hardware": schemas.HardwareConfig, "train": schemas.TrainConfig,
              "data": schemas.DataConfig, "objective": objectives, "regime": regimes}
    restated = []
    for group, schema in groups.items():
        for path in sorted((CONFIGS / group).glob("*.yaml")):
            own_schema = schema.facts(path.stem).settings if hasattr(schema, "facts") else schema
            defaults = {f.name: f.default for f in dataclasses.fields(own_schema)
                        if f.default is not dataclasses.MISSING}
            own = yaml.safe_load(path.read_text()) or {}
            restated += [f"{group}/{path.name}: {key}" for key, value in own.items()
                         if key not in ("defaults", "name") and key in defaults and value != "???"
                         and value in (defaults[key], getattr(defaults[key], "value", object()))]
    assert not restated, restated
