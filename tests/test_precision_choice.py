"""`hardware.precision=auto` on GPUs this machine does not have: the choice is a rule over the device's compute
capability, shared by the run and the memory planner, and QLoRA's compute dtype follows it."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ftk import hardware, schemas


@pytest.mark.parametrize("capability, expected", [((6, 0), "fp16"), ((7, 0), "fp16"), ((7, 5), "fp16"),
                                                  ((8, 0), "bf16"), ((8, 6), "bf16"), ((8, 9), "bf16"),
                                                  ((9, 0), "bf16"), ((10, 0), "bf16")])
def test_auto_precision_by_compute_capability(capability, expected):
    assert hardware.auto_precision("cuda", capability) == expected


def test_auto_precision_on_cpus():
    assert hardware.auto_precision("cpu", cpu_bf16=True) == "bf16"
    assert hardware.auto_precision("cpu", cpu_bf16=False) == "fp32"


class FakeGPU:
    """torch.cuda as a V100 or T4 presents itself: visible, bf16 "supported" (by emulation), capability < 8."""

    def __init__(self, monkeypatch, capability):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16")])
def test_run_and_planner_pick_the_same_precision_on_a_gpu(capability, expected, monkeypatch):
    # Before the fix both asked torch.cuda.is_bf16_supported(), which is True on a V100: bf16, emulated.
    FakeGPU(monkeypatch, capability)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    hw = OmegaConf.structured(schemas.HardwareConfig)
    assert hardware.resolve(hw, batch_size=8, max_steps=10).precision == expected

    from ftk import planner

    cfg = OmegaConf.create({"hardware": OmegaConf.to_container(hw),
                            "train": {"batch_size": 8, "seq_len": 64, "max_steps": 10}, "objective": {"name": "clm",
                                                                                   "mlm_probability": 0.15}})
    assert planner.setup_from_cfg(cfg).precision == expected


@pytest.mark.parametrize("setting, precision, expected", [("auto", "fp16", "fp16"), ("auto", "bf16", "bf16"),
                                                          ("auto", "fp32", "bf16"), ("fp32", "fp16", "fp32")])
def test_qlora_compute_dtype_follows_the_precision(setting, precision, expected):
    assert hardware.qlora_compute_dtype(setting, precision) == expected
    from ftk.regimes.table import settings_of

    assert settings_of("qlora").compute_dtype == "auto"


def test_fp32_runs_on_cuda_use_tf32_and_16_bit_runs_do_not(monkeypatch):
    import gc

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)  # no CUDA allocator here to empty
    monkeypatch.setattr(gc, "collect", lambda *a: 0)
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        hardware.configure_cuda(hardware.Plan("cuda", "fp32", 1, 1, 1, "adamw", False, "none"))
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        hardware.configure_cuda(hardware.Plan("cuda", "bf16", 1, 1, 1, "adamw", False, "none"))
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
        hardware.configure_cuda(hardware.Plan("cpu", "fp32", 1, 1, 1, "adamw", False, "none"))
        assert torch.get_float32_matmul_precision() == "highest"  # CPU runs: untouched
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
