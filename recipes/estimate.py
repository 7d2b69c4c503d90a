"""`ftk estimate`: the memory a training run needs per device, against the hardware profile's budget.

Lifecycle: compose (the finetune groups + `estimate`) -> validate -> the model's shape (ftk's model options,
a checkpoint's config.json, or the newest pretrain run's) -> ftk.planner.estimate -> a table, the verdict and
the cheapest changes that would fit. Loads no weights, writes nothing, exits 0 whatever the verdict
(`ftk pretrain` and `ftk finetune` run the same planner and stop when the run cannot fit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import hydra
from omegaconf import DictConfig

from ftk import runs, schemas
from ftk.errors import UsageError, reported
from ftk.ranges import ranged


WEIGHTS = ("ftk", "16bit")  # as ftk holds them | the published tables' convention (16-bit + fp32 master copy)


@dataclass
class EstimateOptions:
    weights: str = "ftk"           # ftk: fp32 built from scratch, a checkpoint in its saved dtype, autocast on top
                                   # 16bit: 16-bit weights + an fp32 master copy of the trainable ones
    devices: Optional[int] = ranged(None, ge=1)  # devices to plan for; None: WORLD_SIZE, or the visible GPUs (ddp/fsdp)


@dataclass
class EstimateConfig(schemas.FinetuneConfig):
    estimate: EstimateOptions = field(default_factory=EstimateOptions)


SCHEMA = EstimateConfig
schemas.register()


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="estimate_schema", node=EstimateConfig)


register()


@hydra.main(version_base=None, config_path="pkg://ftk.configs", config_name="estimate")
@reported
def main(cfg: DictConfig) -> None:
    try:
        estimate(cfg)
    finally:
        runs.drop_empty_run_dir()


def estimate(cfg: DictConfig):
    schemas.validate_finetune(cfg)
    from ftk import planner, regimes
    from ftk.schemas import Objective

    from ftk.objectives.table import NAMES, fits

    regimes.check_fits(cfg.regime.name, Objective(cfg.objective.name))
    shape = _shape(cfg)
    if not fits(cfg.objective.name, shape.encoder):
        kind = "an encoder" if shape.encoder else "a decoder"
        fitting = [name for name in NAMES if fits(name, shape.encoder)]
        raise UsageError(f"{shape.model_type} is {kind}: pass objective={' or objective='.join(fitting)}")
    devices = cfg.estimate.devices or _devices(cfg)
    weights = str(cfg.estimate.weights)
    if weights not in WEIGHTS:
        raise UsageError(f"estimate.weights must be ftk or 16bit, got {weights}")
    setup = planner.setup_from_cfg(cfg, devices=devices, weights=weights)
    budget, source = planner.budget_for(cfg.hardware, setup)
    result = planner.estimate(shape, setup, budget, source)
    planner.print_estimate(result)
    return result


def _shape(cfg: DictConfig):
    from ftk import planner

    m = cfg.model
    if m.name_or_path:
        from ftk.models import check_model_path

        check_model_path(m.name_or_path)
        return planner.shape_from_checkpoint(m.name_or_path, m.trust_remote_code)
    from hydra.core.hydra_config import HydraConfig

    choice = HydraConfig.get().runtime.choices.get("model")
    if choice not in (None, "pretrained"):
        return planner.shape_from_model_options(m, f"model={choice}, built from scratch")

    newest = runs.newest_pretrained()
    if newest is None:
        raise UsageError("no model given and no finished `ftk pretrain` run under ./runs; pass a shape "
                         "(model=gpt-small) or model.name_or_path=<model dir or hub name>")
    return planner.shape_from_checkpoint(str(newest), m.trust_remote_code)


def _devices(cfg: DictConfig) -> int:
    """WORLD_SIZE when launched by accelerate/torchrun; else, for a multi-GPU strategy, the GPUs visible."""
    from ftk.hardware import world_size
    from ftk.schemas import Strategy

    world = world_size()
    if world > 1 or Strategy(cfg.hardware.strategy) not in (Strategy.ddp, Strategy.fsdp):
        return world
    import torch

    return max(1, torch.cuda.device_count())


