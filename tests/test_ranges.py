"""Every numeric config field declares its range next to its default, and one check enforces them all."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from omegaconf import OmegaConf

from ftk import ranges, schemas
from ftk.errors import UsageError
from ftk.evaluation.schema import EvaluateConfig
from recipes.estimate import EstimateConfig

from ftk.objectives import table as objectives
from ftk.regimes import table as regimes

# the primary schemas, and each regime's and objective's own (chosen by their config group)
ROOTS = (schemas.FinetuneConfig, schemas.MergeConfig, EvaluateConfig, EstimateConfig,
         *(row.settings for row in regimes.ROWS), *(row.settings for row in objectives.ROWS))


def _numeric(tp) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp in (int, float) or any(_numeric(a) for a in args)


def _walk(schema, prefix=""):
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, f


@pytest.mark.parametrize("root", ROOTS, ids=[r.__name__ for r in ROOTS])
def test_every_numeric_field_declares_its_range(root):
    unranged = [name for name, tp, f in _walk(root) if _numeric(tp) and "range" not in f.metadata]
    assert unranged == [], f"give these a range with ftk.ranges.ranged(...): {unranged}"


@pytest.mark.parametrize("root", ROOTS, ids=[r.__name__ for r in ROOTS])
def test_every_default_lies_in_its_range(root):
    ranges.check(OmegaConf.structured(root))  # raises on a default outside its own range


@pytest.mark.parametrize("key,value,message", [
    ("train.beta2", 1.5, "train.beta2=1.5 is out of range: must be < 1 (set it in [0, 1))"),
    ("train.seed", -1, "train.seed=-1 is out of range: must be >= 0 (set it in [0, 4294967295])"),
    ("train.lr", float("inf"), "train.lr=inf is not a finite number (set it in (0, inf))"),
    ("model.num_heads", 0, "model.num_heads=0 is out of range: must be >= 1 (set it in [1, inf))"),
    ("regime.lora_dropout", 1.0, "regime.lora_dropout=1.0 is out of range: must be < 1 (set it in [0, 1))"),
])
def test_the_first_violation_is_one_line_naming_key_and_interval(key, value, message):
    cfg = OmegaConf.structured(schemas.FinetuneConfig)
    cfg.regime, cfg.objective = regimes.settings_of("lora"), objectives.settings_of("clm")
    OmegaConf.update(cfg, key, value)
    with pytest.raises(UsageError) as err:
        ranges.check(cfg)
    assert str(err.value) == message


def test_unset_optionals_and_lists_are_checked_element_by_element():
    cfg = OmegaConf.structured(EvaluateConfig)
    ranges.check(cfg)  # None (unset) context/stride/max_tokens are fine
    cfg.eval.shots = [0, 1, -8]
    with pytest.raises(UsageError, match=r"eval.shots=-8 is out of range"):
        ranges.check(cfg)
