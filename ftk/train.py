"""The one training loop, shared by `ftk pretrain` and `ftk finetune`.

accelerate owns devices, mixed precision and distribution (`Accelerator.prepare`, `backward`,
`clip_grad_norm_`); the loop body is ours so that it can be exact about three things:

* Data position. The global batch of step s is stream positions [s*B, (s+1)*B); each process takes
  its slice, so resuming at step s re-reads nothing and skips nothing, in O(1).
* Randomness. Dropout and masking are reseeded every step from (seed, step, rank), so a resumed run
  draws what the uninterrupted one would: losses after a resume are bit-identical on CPU fp32.
* Loss weighting. Objectives return (sum, count); every target token of the global batch weighs
  the same, whatever the micro-batch split, the number of processes or the share of masked tokens.

Its parts are named: `run` (the loop), `accumulate_gradients` (one step's forward and backward passes),
`evaluate` (validation) and `MetricsLog`. At about 510
lines it is over the usual 400: they share the loop's state and its exactness rules, which are easier to
check read together than across modules.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Tuple

import numpy as np
import torch

from ftk import checkpoint, curves, trackers
from ftk.checkpoint import TrainState
from ftk.cpu_attention import use_matmul_attention
from ftk.data.sampler import BlockStream
from ftk.errors import NumericError, Preempted
from ftk.grad_sync import LateUnfrozenSync
from ftk.schemas import OnNonFinite
from ftk.hardware import Plan, use_fused_kernels
from ftk.optim import build_optimizer, build_scheduler
from ftk.progress import TrainingProgress
from ftk.signals import StopRequest


class Source(Protocol):
    """Training data the loop can address by index."""

    n_train: int

    def train_batch(self, indices: np.ndarray) -> Any: ...

    def validation_batches(self, batch_size: int, limit: int) -> Iterable[Any]: ...

    def tokens_in(self, batch: Any) -> int: ...


class BlockSource:
    """Packed LM blocks (numpy, possibly memory-mapped) served as int64 tensors."""

    def __init__(self, train: np.ndarray, validation: np.ndarray):
        self.train, self.validation = train, validation
        self.n_train = len(train)

    def train_batch(self, indices: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.train[np.sort(indices)], dtype=np.int64))

    def validation_batches(self, batch_size: int, limit: int) -> Iterable[torch.Tensor]:
        n = len(self.validation) if not limit else min(len(self.validation), limit * batch_size)
        for start in range(0, n, batch_size):
            yield torch.from_numpy(np.asarray(self.validation[start:min(n, start + batch_size)], dtype=np.int64))

    def tokens_in(self, batch: torch.Tensor) -> int:
        return batch.numel()


class Callback(Protocol):
    """Regime hooks: called before each optimizer step (e.g. to unfreeze layers or change the lr)."""

    def on_step_start(self, step: int, model: Any, optimizer: Any) -> None: ...


@dataclass
class LoopResult:
    state: TrainState
    history: List[Dict[str, Any]] = field(default_factory=list)  # every metrics.jsonl line of this process
    final_eval: Dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    first_step_s: Optional[float] = None  # seconds from process start to the end of the first step


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    return int(np.random.SeedSequence([seed, step, rank, stream]).generate_state(1)[0])


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        if device.type == "cuda" and batch.device.type == "cpu":
            # From pinned host memory the copy is asynchronous (non_blocking is a no-op from pageable memory)
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _inputs(objective: Any, batch: Any, seed: int, device: torch.device) -> Dict[str, torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return _to(objective.inputs(batch, generator), device)


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written; trimmed on resume."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            # Lines past the checkpoint belong to steps that will be run again: drop them.
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
        self._handle = open(path, "a") if enabled else None

    def write(self, record: Dict[str, Any]) -> None:
        if self._handle:
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()

    def close(self) -> None:
        if self._handle:
            self._handle.close()


def _step_of(line: str) -> float:
    """The step a metrics line records; a line cut short by a kill counts as past any checkpoint (dropped)."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return math.inf


def validation_sums(model: Any, objective: Any, inputs: Dict[str, torch.Tensor], device: Any) -> torch.Tensor:
    """(loss sum, target count, correct predictions, then the sums of the objective's `metric_names`) of one
    validation batch, as one float64 tensor on `device`.

    Each part is moved to `device` before stacking: an objective may count on the host (a 0-dim CPU tensor
    is fine in arithmetic with CUDA tensors, but torch.stack refuses to mix devices)."""
    if hasattr(objective, "eval_sums"):  # task objectives also count correct predictions
        sums = objective.eval_sums(model, inputs)
        parts = (sums["loss_sum"], sums["count"], sums["correct"], *(sums[k] for k in _metric_names(objective)))
    else:
        loss_sum, count = objective.loss(model, inputs)
        parts = (loss_sum, count, torch.zeros(()))
    return torch.stack([torch.as_tensor(p).to(device=device, dtype=torch.float64) for p in parts])


def _metric_names(objective: Any) -> Tuple[str, ...]:
    return tuple(getattr(objective, "metric_names", ()))


@torch.no_grad()
def evaluate(model: Any, objective: Any, source: Source, batch_size: int, limit: int, seed: int,
             accelerator: Any) -> Dict[str, float]:
    """Token-weighted validation loss (and perplexity) over the first `limit` batches, split over ranks."""
    if not checkpoint.sharded(accelerator):
        # Forwards through the model itself, not DDP's wrapper: DDP broadcasts buffers (Llama's rotary
        # frequencies, BERT's position ids) in the first forward after training, a collective that a rank with
        # no validation batch never joins (a hang when there are fewer batches than processes). No gradients
        # flow here, so DDP has nothing else to do; and eager, so varying batch shapes recompile nothing.
        # (Under FSDP the sharded model must run on every rank: see the padding forwards below.)
        model = accelerator.unwrap_model(model, keep_torch_compile=False)
    was_training = model.training
    model.eval()
    # loss sum, count, correct, and the objective's own figures
    total = torch.zeros(3 + len(_metric_names(objective)), dtype=torch.float64, device=accelerator.device)
    world, rank = accelerator.num_processes, accelerator.process_index
    seen, mine, first = 0, 0, None
    for i, batch in enumerate(source.validation_batches(batch_size, limit)):
        seen, first = i + 1, batch if first is None else first
        if i % world != rank:
            continue
        mine += 1
        inputs = _inputs(objective, batch, step_seed(seed, i, 0, stream=1), accelerator.device)
        total += validation_sums(model, objective, inputs, total.device)
    if checkpoint.sharded(accelerator) and first is not None:
        # FSDP gathers each block's weights with every rank, so all ranks must run the same number of forwards:
        # a rank that had one batch fewer repeats the first one and drops the result.
        for _ in range(-(-seen // world) - mine):
            objective.loss(model, _inputs(objective, first, step_seed(seed, 0, 0, stream=1), accelerator.device))
    total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    loss = (total[0] / total[1].clamp(min=1)).item()
    if getattr(objective, "language_model", True):
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
    own = {f"eval_{name}": (total[3 + i] / total[1].clamp(min=1)).item()
           for i, name in enumerate(_metric_names(objective))}
    return {"eval_loss": loss, "eval_accuracy": (total[2] / total[1].clamp(min=1)).item(), **own}


def run(*, model: Any, tokenizer: Any, objective: Any, source: Source, train_cfg: Any, plan: Plan,
        accelerator: Any, run_dir: Path, resume_from: Optional[Path] = None,
        callbacks: Iterable[Callback] = (), extra_loss: Optional[Callable[[Any, int], torch.Tensor]] = None,
        lr_multiplier: Optional[Callable[[int], float]] = None, started_at: Optional[float] = None,
        settings: Optional[Dict[str, Any]] = None, apply_changes: bool = False) -> LoopResult:
    """Train `model` for train_cfg.max_steps optimizer steps; returns the final state and metrics.

    Regimes plug in through `callbacks` (called before each step, e.g. to unfreeze layers),
    `lr_multiplier` (a factor on the schedule by step) and `extra_loss(model, step)` (a penalty or
    replay loss added to the task loss once per step).
    `settings` (ftk.resume_check) are stored in every checkpoint; `apply_changes`: the user accepted settings
    that differ from the checkpoint's, so the optimizer's hyperparameters and the schedule's peak lr are this
    command's, not the checkpoint's.
    """
    t = train_cfg
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    checkpoints_dir = run_dir / "checkpoints"

    state = TrainState()
    if resume_from is not None:
        state = checkpoint.load_state(resume_from)
        checkpoint.load_model_weights(model, resume_from / "model")
    if settings is not None:
        state.extra["settings"] = settings

    use_fused_kernels(model)  # the same functions in fused kernels (GPT-2's gelu_new): see ftk.hardware
    if plan.matmul_attention:
        use_matmul_attention(model)  # CPU bf16: SDPA's flash kernel is slower than matmuls; see ftk.cpu_attention
    optimizer = build_optimizer(model, t, plan.optimizer, plan.device)
    scheduler = build_scheduler(optimizer, t, lr_multiplier)
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    fresh_base_lrs = list(scheduler.base_lrs)
    # Under FSDP, prepare() shards the model (weights loaded above, on every rank, are cut into shards) and
    # points the optimizer at the shards; its state is then restored shard by shard.
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume_from is not None:
        checkpoint.load_optimizer(accelerator, model, optimizer, resume_from / "optimizer.pt")
        sched = checkpoint.load_tensors(resume_from / "scheduler.pt")
        scheduler.load_state_dict(sched["scheduler"])
        if sched.get("scaler") is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(sched["scaler"])
        if apply_changes:
            _apply_hyperparameters(optimizer, scheduler, fresh_groups, fresh_base_lrs)

    per_process = plan.micro_batch_size * plan.grad_accum
    global_batch = per_process * world
    # A source may order its own stream (ExampleSource groups examples by length). The group is the global
    # batch, not a process's micro-batch: then a step's examples are the same on 1 or N processes, with any
    # gradient accumulation, and so are the losses; each micro-batch is a slice of one sorted group.
    stream = source.stream(t.seed, global_batch) if hasattr(source, "stream") else \
        BlockStream(source.n_train, t.seed)
    # Trimmed to the step training restarts from, also 0: a run killed before its first checkpoint starts over,
    # and its lines would otherwise appear twice.
    log = MetricsLog(run_dir / "metrics.jsonl", main, state.step)
    if resume_from is not None:
        trackers.resumed_at(accelerator, state.step)  # the trackers' curves continue from the checkpoint too
    progress = TrainingProgress(t.max_steps, state.step, enabled=main)
    result = LoopResult(state=state)
    # The model itself, not torch.compile's wrapper (whose parameter names start with `_orig_mod.`): regimes
    # unfreeze, L2-SP anchors and best/ are all by the model's own parameter names.
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    late_grads = LateUnfrozenSync(model, unwrapped)  # DDP averages only what trained when it was wrapped
    callbacks = list(callbacks)
    patience = getattr(t, "early_stopping_patience", 0)
    best_dir = run_dir / "best"

    def save() -> Path:
        path = None
        gathered = checkpoint.gather(accelerator, model, optimizer)  # FSDP: every rank sends its shards
        if main:
            path = checkpoint.save(checkpoints_dir, state, unwrapped, tokenizer, optimizer, scheduler,
                                   accelerator.scaler, t.keep_last, gathered=gathered)
            # curves.png so far: at each checkpoint, and at the end (the last save below); never fails the run
            curves.write(run_dir, progress.message)
        accelerator.wait_for_everyone()
        # Other ranks name the newest folder without verifying it (hashing every file would stall them).
        return path or (checkpoint.step_dirs(checkpoints_dir) or [checkpoints_dir])[-1]

    model.train()
    window_start, window_tokens, window_loss, window_count = time.perf_counter(), 0, 0.0, 0.0
    window_metrics: Dict[str, float] = {}  # the objective's own figures, summed over the window's steps
    run_start_elapsed, loop_start = state.elapsed, time.perf_counter()
    try:
        with StopRequest() as stop:
            while state.step < t.max_steps:
                step = state.step
                for cb in callbacks:
                    cb.on_step_start(step, unwrapped, optimizer)
                torch.manual_seed(step_seed(t.seed, step, rank))  # dropout draws depend only on (seed, step, rank)
                positions = stream.take(state.samples + rank * per_process, per_process)
                micro_inputs = [
                    _inputs(objective, source.train_batch(positions[m * plan.micro_batch_size:
                                                                   (m + 1) * plan.micro_batch_size]),
                            step_seed(t.seed, step, rank, stream=2 + m), accelerator.device)
                    for m in range(plan.grad_accum)]
                # The stop flags are read after the backward passes and agreed in the step's one collective.
                loss_value, step_tokens_global, step_metrics, (time_up, stop_now) = accumulate_gradients(
                    model, unwrapped, objective, micro_inputs, accelerator, extra_loss, step,
                    lambda: (t.max_minutes is not None and run_start_elapsed + time.perf_counter() - loop_start
                             >= 60 * t.max_minutes, stop.requested))
                late_grads()
                grad_norm = None
                if t.max_grad_norm > 0 and accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                    # Under FSDP the norm is a DTensor over the shards: its full value is the global norm.
                    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                # With fp16 an infinite gradient is the loss scaler's business (it skips the step and
                # lowers the scale); elsewhere it is a fault like a non-finite loss.
                grad_fault = grad_norm is not None and not math.isfinite(grad_norm) and plan.precision != "fp16"
                if not math.isfinite(loss_value) or grad_fault:
                    optimizer.zero_grad(set_to_none=True)
                    if accelerator.scaler is not None:
                        # fp16: clipping has unscaled this step's gradients, and only the scaler's update() clears
                        # that mark (optimizer.step() is not called); lower the scale as for an overflow.
                        scaler = accelerator.scaler
                        scaler.update(new_scale=scaler.get_scale() * scaler.get_backoff_factor())
                    state.skipped_batches += 1
                    what = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {grad_norm}"
                    if OnNonFinite(t.on_nonfinite) is OnNonFinite.stop:
                        raise NumericError(
                            f"non-finite {what} at step {step + 1}; no checkpoint was written with it. Lower "
                            "train.lr, raise train.warmup_steps, use hardware.precision=fp32 or bf16 instead of "
                            "fp16, or set train.on_nonfinite=skip")
                    if state.skipped_batches > t.max_skipped_batches:
                        raise NumericError(f"{state.skipped_batches} batches skipped for non-finite losses "
                                           f"(last at step {step + 1}, {what}); lower train.lr")
                    progress.message(f"[yellow]step {step + 1}: {what}, batch skipped[/yellow]")
                else:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state.step += 1
                state.samples += global_batch
                tokens_now = step_tokens_global
                state.tokens += tokens_now
                window_tokens += tokens_now
                if math.isfinite(loss_value):
                    window_loss += loss_value
                    window_count += 1
                    for key, value in step_metrics.items():
                        window_metrics[key] = window_metrics.get(key, 0.0) + value
                state.elapsed = run_start_elapsed + (time.perf_counter() - loop_start)
                if result.first_step_s is None and started_at is not None:
                    result.first_step_s = time.time() - started_at

                record: Dict[str, Any] = {}
                if state.step % t.log_every == 0 or state.step == t.max_steps:
                    now = time.perf_counter()
                    tps = window_tokens / max(now - window_start, 1e-9)
                    record = {"step": state.step, "loss": window_loss / max(window_count, 1),
                              "lr": scheduler.get_last_lr()[0], "tokens": state.tokens, "tokens_per_s": tps,
                              "elapsed_s": round(state.elapsed, 3), "epoch": round(stream.epoch_at(state.samples), 4)}
                    record.update({k: v / max(window_count, 1) for k, v in window_metrics.items()})
                    if grad_norm is not None:
                        record["grad_norm"] = grad_norm
                    eta = (t.max_steps - state.step) * (now - window_start) / max(1, window_count)
                    progress.update(state.step, record["loss"], record["lr"], tps, eta)
                    window_start, window_tokens, window_loss, window_count = now, 0, 0.0, 0.0
                    window_metrics = {}
                at_end = state.step == t.max_steps or time_up
                if (t.eval_every and state.step % t.eval_every == 0) or at_end:
                    metrics = evaluate(model, objective, source, plan.micro_batch_size, t.eval_batches, t.seed,
                                       accelerator)
                    record = record or {"step": state.step, "tokens": state.tokens,
                                        "elapsed_s": round(state.elapsed, 3)}
                    record.update(metrics)
                    progress.message(f"step {state.step}: validation " + ", ".join(
                        f"{k[5:]} {v:.4f}" for k, v in metrics.items()))
                    result.final_eval = metrics
                    state.extra["last_eval"] = {"step": state.step, **metrics}  # survives a kill after the last step
                    window_start = time.perf_counter()  # tokens/s measures training, not validation
                    if patience:
                        stop_early = _early_stopping(state, metrics, patience, unwrapped, best_dir, main)
                        if stop_early:
                            progress.message(f"early stopping at step {state.step}: no better validation loss in "
                                             f"{patience} evaluations; keeping step {state.extra['best_step']}")
                if record:
                    log.write(record)
                    trackers.log(accelerator, record)  # logger=...: the same line into each tracker (rank 0)
                    result.history.append(record)
                if t.save_every and state.step % t.save_every == 0 and not at_end:
                    save()
                if time_up:
                    progress.message(f"train.max_minutes={t.max_minutes} reached at step {state.step}")
                    break
                if patience and state.extra.get("stopped_early"):
                    break
                if stop_now:
                    path = save()
                    raise Preempted(
                        f"stopped by {stop.signal_name or 'a signal to another process'} at step {state.step}; "
                        f"checkpoint saved to {path}. "
                        f"Resume with the same command plus train.resume=auto hydra.run.dir={run_dir}")
    except BaseException as exc:
        trackers.end(accelerator, "KILLED" if isinstance(exc, (Preempted, KeyboardInterrupt)) else "FAILED")
        raise
    finally:
        progress.close()
        log.close()
    result.tokens_per_s = state.tokens / max(state.elapsed, 1e-9)
    if patience and state.extra.get("best_step") not in (None, state.step):
        accelerator.wait_for_everyone()
        checkpoint.load_model_weights(unwrapped, best_dir)  # final/ is the best model, not the last
        result.final_eval = dict(state.extra["best_eval"])
    if not result.final_eval:
        # Resumed from the final checkpoint (killed while final/ was written): no step ran, so no validation did;
        # the figures of that step are in the checkpoint, or are measured again.
        last = state.extra.get("last_eval") or {}
        if last.get("step") == state.step:
            result.final_eval = {k: v for k, v in last.items() if k != "step"}
        elif state.step > 0:
            result.final_eval = evaluate(model, objective, source, plan.micro_batch_size, t.eval_batches, t.seed,
                                         accelerator)
    save()  # the final state as a checkpoint too: `train.resume=auto train.max_steps=<more>` continues it
    return result


def real_tokens(inputs: Dict[str, torch.Tensor]) -> Any:
    """Tokens that are not padding (ranks differ in padding): packed rows count theirs, padded batches by their
    attention mask, LM blocks have none."""
    if "real_tokens" in inputs:
        return inputs["real_tokens"]
    mask = inputs.get("attention_mask")
    return mask.sum() if mask is not None else inputs["input_ids"].numel()


def accumulate_gradients(model: Any, unwrapped: Any, objective: Any, micro_inputs: List[Dict[str, torch.Tensor]],
                         accelerator: Any, extra_loss: Optional[Callable[[Any, int], torch.Tensor]], step: int,
                         stop_flags: Callable[[], Tuple[bool, bool]] = lambda: (False, False),
                         ) -> Tuple[float, int, Dict[str, float], Tuple[bool, bool]]:
    """The gradients of one optimizer step, accumulated over this process's micro-batches; returns the step's
    loss (mean over every target of the global batch), its real (unpadded) tokens over all processes, the
    objective's own figures (`metric_names`, each a mean over every target of the global batch), and the stop
    flags (time up, stop now) as every process agreed them.

    Two collectives per step: the target count (needed before the backward passes) and, after them, one
    vector of loss, tokens, the objective's figures and the stop flags; and one host sync (the loss a fault
    check needs before the optimizer step). Token counts stay on the device until then."""
    world = accelerator.num_processes
    device = accelerator.device
    # Every target token of the global batch weighs the same: divide by the global count.
    local_count = sum(objective.targets(inp) for inp in micro_inputs)
    global_count = accelerator.reduce(torch.tensor(float(local_count), device=device),
                                      reduction="sum").clamp(min=1.0)
    names = _metric_names(objective)
    # [loss, real tokens, time up, stop now, the objective's figures...], summed over processes at the end
    totals = torch.zeros(4 + len(names), dtype=torch.float64, device=device)
    for m, inputs in enumerate(micro_inputs):
        last = m == len(micro_inputs) - 1
        with accelerator.no_sync(model) if not last else _null():
            if names:
                loss_sum, _, sums = objective.loss_with_metrics(model, inputs)
                totals[4:] += torch.stack([torch.as_tensor(sums[k]).to(totals) for k in names])
            else:
                loss_sum, _ = objective.loss(model, inputs)
            # DDP averages gradients over processes; scale by world so the result is the global mean.
            loss = loss_sum * (world / global_count)
            if extra_loss is not None and m == 0:
                loss = loss + extra_loss(unwrapped, step)
            accelerator.backward(loss)
        totals[0] += loss_sum.detach().double()
        totals[1] += real_tokens(inputs)
    # Each process has its own clock and may see a signal a step later than another, yet all must stop (and
    # save, a collective under FSDP and DDP) at the same step, or the next collective hangs: the flags ride
    # along, and any process's flag stops all.
    time_up, stop_now = stop_flags()
    totals[2], totals[3] = float(time_up), float(stop_now)
    if world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    *values, count = torch.cat([totals, global_count.double().view(1)]).tolist()  # the step's one host sync
    return (values[0] / count, int(values[1]), {k: v / count for k, v in zip(names, values[4:])},
            (values[2] > 0, values[3] > 0))


def _apply_hyperparameters(optimizer: Any, scheduler: Any, groups: List[Dict[str, Any]],
                           base_lrs: List[float]) -> None:
    """Loading a checkpoint's optimizer and scheduler brings back its lr, betas, eps and weight decay; put this
    command's back (the moments and the step count stay the checkpoint's) and set the lr of the coming step."""
    for group, fresh in zip(optimizer.param_groups, groups):
        group.update({k: v for k, v in fresh.items() if k != "lr"})
    scheduler.base_lrs = list(base_lrs)
    for group, base, factor in zip(optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _early_stopping(state: TrainState, metrics: Dict[str, float], patience: int, model: Any, best_dir: Path,
                   main: bool) -> bool:
    """Keep the best model (by validation loss) in <run>/best; True when patience has run out."""
    loss = metrics["eval_loss"]
    if state.best_eval_loss is None or loss < state.best_eval_loss:
        state.best_eval_loss = loss
        state.extra.update(best_step=state.step, best_eval=dict(metrics), bad_evals=0)
        if main:
            checkpoint.save_weights(model, best_dir)
        return False
    state.extra["bad_evals"] = state.extra.get("bad_evals", 0) + 1
    if state.extra["bad_evals"] >= patience:
        state.extra["stopped_early"] = True
        return True
    return False


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
