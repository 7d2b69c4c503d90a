"""The regime table is the one place a regime is described: every row has its config option and module,
each option composes to its own schema and restates no default, a key of another regime is refused, and
the planner's trainable count from the row equals what the regime really trains on real tiny models."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ftk.regimes.table import NAMES, ROWS, facts, settings_of

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "regime"


def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_module

    from ftk import schemas

    schemas.register()
    with initialize_config_module("ftk.configs", version_base=None):
        return hydra_compose("finetune", overrides=list(overrides))


def test_every_row_has_its_option_and_module_and_every_option_its_row():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(NAMES)
    for row in ROWS:
        assert callable(importlib.import_module(f"ftk.regimes.{row.module}").apply), row.name


@pytest.mark.parametrize("name", NAMES)
def test_each_option_composes_to_its_schema(name):
    cfg = compose(f"regime={name}")
    assert OmegaConf.get_type(cfg.regime) is facts(name).settings
    assert OmegaConf.to_container(cfg.regime) == OmegaConf.to_container(settings_of(name))


def test_a_key_of_another_regime_is_refused_naming_the_valid_keys(capsys):
    from tests.conftest import ftk

    assert ftk("finetune", "regime=full", "regime.lora_r=64") == 2
    err = capsys.readouterr().err
    assert "unknown config key 'regime.lora_r'; valid keys here: name, lr" in err and "Traceback" not in err


def test_lora_variants_extend_lora():
    for name in ("qlora", "dora"):
        cfg = compose(f"regime={name}", "regime.lora_r=4")
        assert cfg.regime.name == name and cfg.regime.lora_r == 4 and cfg.regime.lora_alpha == 16


TINY = {
    "gpt2": lambda: __import__("transformers").GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100,
                                                          n_positions=32, pad_token_id=0),
    "llama": lambda: __import__("transformers").LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                            num_key_value_heads=2, intermediate_size=96,
                                                            vocab_size=100, pad_token_id=0),
    "bert": lambda: __import__("transformers").BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=96, vocab_size=100,
                                                          max_position_embeddings=40, pad_token_id=0),
}


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("name", [n for n in NAMES if n != "qlora"])  # qlora: tests/test_qlora_cpu.py
def test_planned_trainable_parameters_equal_what_the_regime_trains(name, family):
    """The planner reads the row (adapter cost, frozen body, head) and must agree with the real module."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from ftk import planner, regimes
    from ftk.schemas import Objective

    torch.manual_seed(0)
    config = TINY[family]()
    config.num_labels = 3
    model = AutoModelForSequenceClassification.from_config(config)
    # a new task head; BERT's pooler as in a hub checkpoint (pretrained), as the planner assumes
    new_head = [k for k in model.state_dict() if k.startswith(("score", "classifier"))]
    settings = settings_of(name)
    prepared = regimes.apply(name, model, regimes.Context(settings, Objective.classification, new_head))
    for callback in prepared.callbacks:  # phased regimes: their last phase, as the planner plans it
        callback.on_step_start(10**6, prepared.model, None)
    trainable = sum(p.numel() for p in prepared.model.parameters() if p.requires_grad)
    shape = planner.shape_from_config(config)
    setup = planner.Setup(regime=name, objective="classification", num_labels=3, seq_len=16)
    assert planner.estimate(shape, setup, suggest=False).trainable == trainable
