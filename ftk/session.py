"""What every training recipe does first and last: plan the hardware, start accelerate, record the
environment; save final/, write summary.json and print the closing table."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from ftk import hardware, runs
from ftk.errors import UsageError
from ftk.hardware import Plan
from ftk.schemas import Device

ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class Session:
    plan: Plan
    accelerator: Any
    say: Callable[[str], None]  # prints on the main process only


def start(cfg: Any, run_dir: Path, announce: bool = True) -> Session:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    import transformers

    transformers.utils.logging.disable_progress_bar()  # our own progress display is the one to watch
    hardware.set_threads(cfg.hardware.num_threads)
    plan = hardware.resolve(cfg.hardware, cfg.train.batch_size, cfg.train.max_steps)
    hardware.configure_cuda(plan)
    # accelerate keeps one global state per process; a multirun sweep runs several jobs in one process,
    # each with its own precision, so forget the previous job's choice (the process group is kept).
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    _forget_fsdp(plan)
    plan, fsdp_plugin, note = _fsdp(plan)
    if fsdp_plugin is not None:
        _check_fsdp_fits(cfg)
    # Accelerator(fsdp_plugin=...) sets ACCELERATE_USE_FSDP=true for the whole process; a multirun sweep's next
    # job must still see only what the user launched with, so the variable is put back afterwards.
    launched_env = os.environ.get("ACCELERATE_USE_FSDP")
    # torch.compile through accelerate: prepare() wraps the model; inductor caches compiled kernels on disk,
    # so a second run of the same shapes compiles much faster. The plan turns it on only where it pays off.
    from ftk import trackers

    accelerator = Accelerator(cpu=plan.device == "cpu", mixed_precision=ACCELERATE_PRECISION[plan.precision],
                              dynamo_backend=cfg.hardware.compile_backend if plan.compile else "no", fsdp_plugin=fsdp_plugin,
                              kwargs_handlers=[process_group_kwargs(cfg.hardware)],
                              log_with=trackers.build(cfg.get("logger"), run_dir) or None)
    if launched_env is None:
        os.environ.pop("ACCELERATE_USE_FSDP", None)
    else:
        os.environ["ACCELERATE_USE_FSDP"] = launched_env
    if fsdp_plugin is not None and plan.device == "cpu":
        _fsdp_on_cpu(accelerator, fsdp_plugin)
    set_seed(cfg.train.seed)  # model initialisation; the loop reseeds per step
    from rich.console import Console

    console = Console(stderr=True, highlight=False, soft_wrap=True)  # paths stay whole, greppable

    def say(text: str) -> None:
        if accelerator.is_main_process:
            console.print(text)

    if announce:  # (a recipe that prints before the session starts said it first)
        say(f"run: {run_dir}")  # where metrics.jsonl, checkpoints/ and final/ go: known from the first second
    if note:
        say(note)
    if Device(cfg.hardware.device) is Device.auto and plan.device == "cpu":
        # e.g. a CPU-only torch on a GPU node (installed on a login node without nvidia-smi): say so at once
        say("hardware=auto: no CUDA device visible to torch, training on the CPU"
            + (f" (torch {_torch_version()} is a CPU build)" if "+cpu" in _torch_version() else ""))
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.write_json(run_dir / "environment.json", {**runs.environment(), "plan": plan.as_dict(),
                                                         "collective_timeout_s": _group_timeout_s(),
                                                         "device_mesh": _mesh(accelerator)})
    trackers.start(accelerator, cfg)  # logger=...: the composed config as hyperparameters (main process only)
    return Session(plan, accelerator, say)


def _mesh(accelerator: Any) -> Optional[str]:
    """The device mesh FSDP shards over ("cpu x2"), when ftk chose one (else fully_shard's default)."""
    mesh = accelerator.torch_device_mesh
    return None if mesh is None else f"{mesh.device_type} x{mesh.size()}"


def _torch_version() -> str:
    import torch

    return torch.__version__


def process_group_kwargs(hw: Any) -> Any:
    """The process group's collective timeout (hardware.timeout_minutes). NCCL's default of 10 minutes kills a
    multi-GPU job while rank 0 writes a large checkpoint (the others wait in wait_for_everyone), or prepares a
    fine-tuning task's data (the others wait in main_process_first's barrier; `ftk pretrain` prepares its corpus
    before the group exists, ftk/data/prepare.py). Applies when the group is created: the
    first job of a sweep sets it for the whole sweep."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=timedelta(minutes=float(hw.timeout_minutes)))


def _group_timeout_s() -> Optional[float]:
    """The default process group's collective timeout as torch holds it (None with one process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        device = torch.device("cpu" if dist.get_backend() == "gloo" else "cuda")
        return dist.distributed_c10d._get_default_group()._get_backend(device).options._timeout.total_seconds()
    except (AttributeError, RuntimeError):  # private API: record nothing rather than fail the run
        return None


def _forget_fsdp(plan: Plan) -> None:
    """A previous FSDP job of this sweep left FSDP in the kept process state (accelerate writes it there);
    put back the plain multi-process type so that this job is FSDP only if it asks for it."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    shared = PartialState._shared_state
    if shared.get("distributed_type") is DistributedType.FSDP:
        shared["distributed_type"] = DistributedType.MULTI_CPU if plan.device == "cpu" else DistributedType.MULTI_GPU


def _fsdp(plan: Plan) -> Tuple[Plan, Any, Optional[str]]:
    """The FSDP plugin for a plan with strategy=fsdp (None otherwise), the plan as it will really run, and a
    note for the user.

    FSDP2 (`fully_shard`, per-parameter DTensor shards) rather than FSDP1: it keeps the original parameters,
    so frozen and trainable ones (LoRA, prompt tuning, freeze_layers) can share a block without
    FSDP1's use_orig_params caveats, and it runs on a CPU mesh with gloo, which is how it is tested."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # `accelerate launch --use_fsdp ...`: the user's FSDP settings come from the environment; keep them,
        # but record what runs and refuse FSDP1, whose checkpoints ftk does not gather.
        if int(os.environ.get("FSDP_VERSION", "1")) != 2:
            raise UsageError("accelerate launch --use_fsdp defaults to FSDP1, which ftk does not support; add "
                             "--fsdp_version 2, or launch with torchrun and hardware=multi-gpu-fsdp")
        from accelerate.utils import FullyShardedDataParallelPlugin

        return replace(plan, strategy="fsdp"), FullyShardedDataParallelPlugin(), None  # read from the environment
    if plan.strategy != "fsdp":
        return plan, None, None
    if plan.world_size == 1:
        # Nothing to shard over: FSDP with one process would only add gathers. The memory planner has already
        # checked that the whole training state fits this one device.
        return replace(plan, strategy="none"), None, (
            "hardware.strategy=fsdp with one process: nothing to shard, running unsharded (launch several "
            "processes with torchrun or accelerate launch to shard)")
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        # One FSDP unit per transformer block (the model's `_no_split_modules`: GPT2Block, LlamaDecoderLayer,
        # BertLayer, ...): a block's weights are gathered only while it computes; accelerate puts the
        # embeddings and the final norm + head in units of their own.
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,  # free gathered weights after each block's forward: the memory FSDP is for
        # ftk gathers full state dicts itself (final/ and checkpoints in Hugging Face format, optimizer state
        # by parameter name); accelerate's save_state, which this setting is for, is not used.
        state_dict_type="FULL_STATE_DICT",
        # Activation checkpointing stays the model's own (hardware.gradient_checkpointing ->
        # gradient_checkpointing_enable): accelerate's FSDP2 wrapper recomputes without restoring the RNG
        # state, so dropout would draw different masks in the recomputation than in the forward.
        activation_checkpointing=False,
        # Every process loads the model before it is sharded (ftk builds or loads it before prepare), so host
        # RAM must hold one copy per process; rank-0-only loading would need transformers' meta-device path.
        cpu_ram_efficient_loading=False,
        cpu_offload=False,
        mixed_precision_policy=_mixed_precision(plan.precision),
    )
    return plan, plugin, None


def _mixed_precision(precision: str) -> Any:
    """bf16/fp16: blocks gathered and computed in 16 bits, but gradients reduced over ranks in float32
    (accelerate's default reduces in 16 bits, which rounds away small gradients as ranks are added); the
    sharded master weights and AdamW state stay float32. fp32: no policy."""
    if precision == "fp32":
        return None
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                                reduce_dtype=torch.float32)


def refuse_unsupported(cfg: Any) -> None:
    """The distribution strategy's refusals (FSDP1, what the sharded loop does not do yet), before any data or
    model is read: recipes call this first, `start` checks again."""
    plan = hardware.resolve(cfg.hardware, cfg.train.batch_size, cfg.train.max_steps)
    _, plugin, _ = _fsdp(plan)
    if plugin is not None:
        _check_fsdp_fits(cfg)


def _check_fsdp_fits(cfg: Any) -> None:
    """What the sharded loop does not do yet, refused before anything is loaded. (Regimes that unfreeze
    during training do work: FSDP2 re-reads requires_grad each time it gathers a block.)"""
    regime = getattr(getattr(cfg, "regime", None), "name", None)  # finetune only; an Enum there
    if getattr(regime, "value", regime) == "prompt_tuning":
        # peft runs the soft prompt's embedding outside FSDP's gather: on 2 processes the first checkpoint
        # fails with "aten.embedding got mixed torch.Tensor and DTensor".
        raise UsageError("regime=prompt_tuning does not work with hardware.strategy=fsdp; use "
                         "hardware.strategy=ddp (the soft prompt is small), or regime=lora")
    if getattr(cfg.hardware, "optimizer", None) is not None and \
            getattr(cfg.hardware.optimizer, "value", cfg.hardware.optimizer) == "adamw_8bit":
        # bitsandbytes' 8-bit AdamW keeps block-wise quantized state per tensor; FSDP2 hands it DTensor shards,
        # which it neither refuses nor handles, and ftk's gathered checkpoints cannot hold its state.
        raise UsageError("hardware.optimizer=adamw_8bit does not work with hardware.strategy=fsdp; use "
                         "hardware.optimizer=adamw (FSDP already shards the optimizer state over the processes)")
    if getattr(cfg.train, "early_stopping_patience", 0):
        # Keeping and restoring the best model would need the sharded weights gathered and scattered back.
        raise UsageError("train.early_stopping_patience is not supported with hardware.strategy=fsdp yet; set "
                         "train.early_stopping_patience=0, or use hardware.strategy=ddp")


def _fsdp_on_cpu(accelerator: Any, plugin: Any) -> None:
    """accelerate turns FSDP on only for GPU-like backends and silently runs plain multi-CPU data parallel
    otherwise; FSDP2's fully_shard works on a CPU device mesh over gloo, so switch it on here (the
    process group and the collectives accelerate uses stay those of the multi-CPU setup)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type is DistributedType.FSDP:
        return
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    # A CPU mesh, said explicitly: fully_shard's default mesh is the machine's accelerator, so with
    # hardware=cpu on a GPU machine the shards would go to CUDA under a gloo group (issue 16, finding 10).
    from accelerate.utils import ParallelismConfig

    parallelism = ParallelismConfig(dp_shard_size=state.num_processes)
    state.parallelism_config = parallelism
    state.device_mesh = parallelism.get_device_mesh("cpu")
    # Both shared states: every later AcceleratorState() copies PartialState's fields over its own (accelerate
    # itself writes FSDP into both on GPUs).
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def finish(session: Session, run_dir: Path, model: Any, tokenizer: Any, summary: Dict[str, Any], title: str,
           extra_json: Optional[Dict[str, Dict[str, Any]]] = None,
           extra_rows: Sequence[Tuple[str, str]] = (), next_steps: Sequence[str] = ()) -> None:
    """Write final/ (Hugging Face format, or a PEFT adapter) and the summary; rank 0 only."""
    accelerator = session.accelerator
    accelerator.wait_for_everyone()
    from ftk import checkpoint

    # Under FSDP every rank holds a shard: gather the full weights to rank 0 (a collective, so before the
    # others return), and final/ is the same plain Hugging Face checkpoint as without FSDP.
    gathered = checkpoint.gather(accelerator, model)
    if not accelerator.is_main_process:
        return
    import shutil

    final = run_dir / "final"
    tmp = run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    accelerator.unwrap_model(model, keep_torch_compile=False).save_pretrained(tmp, safe_serialization=True,
                                                    **({"state_dict": gathered.model} if gathered else {}))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, content in (extra_json or {}).items():
        runs.write_json(tmp / name, content)
    from ftk import model_card

    try:  # README.md: the Hugging Face model card (a failure to write it is reported, never loses the model)
        model_card.for_run(tmp, run_dir, title, {**summary, "final_dir": str(final)},
                           (extra_json or {}).get("ftk_finetune.json"))
    except Exception as exc:  # noqa: BLE001
        session.say(f"[yellow]final/README.md (model card) not written: {type(exc).__name__}: {exc}[/yellow]")
    if final.exists():  # a resumed run that finished again: replace the old final/ only now
        shutil.rmtree(final)
    tmp.replace(final)
    summary = {**summary, "final_dir": str(final)}
    runs.write_json(run_dir / "summary.json", summary)
    from ftk import trackers

    trackers.finish(accelerator, summary)
    rows = [
        ("parameters", f"{summary['parameters'] / 1e6:.2f}M" + (
            f" ({summary['trainable_parameters'] / max(1, summary['parameters']):.1%} trainable)"
            if summary["trainable_parameters"] != summary["parameters"] else "")),
        ("steps", f"{summary['steps']:,}"),
        ("tokens seen", f"{summary['tokens_seen']:,}"),
        ("wall time", runs.format_duration(summary["wall_time_s"])),
        ("tokens/s (training)", f"{summary['tokens_per_s']:,.0f}"),
    ]
    if summary.get("first_step_s") is not None:
        rows.append(("command to first step", f"{summary['first_step_s']:.1f}s"))
    if "final_eval_ppl" in summary:
        rows += [("validation loss", f"{summary['final_eval_loss']:.4f}"),
                 ("validation perplexity", f"{summary['final_eval_ppl']:.2f}")]
    if "final_eval_accuracy" in summary:
        rows += [("validation loss", f"{summary['final_eval_loss']:.4f}"),
                 ("validation accuracy", f"{summary['final_eval_accuracy']:.2%}")]
    rows += list(extra_rows)
    rows.append(("saved", str(final)))
    runs.print_summary(f"ftk {title}: {run_dir}", rows, next_steps)
