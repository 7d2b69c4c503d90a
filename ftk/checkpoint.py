"""Atomic, resumable checkpoints.

A checkpoint is written into `checkpoints/.tmp-step-N/` and renamed to `checkpoints/step-N/` only
when every file is on disk, so a kill at any moment leaves the previous checkpoint intact; older
ones are pruned only after that rename. No RNG state is stored: the loop reseeds every step from
(seed, step, rank), so dropout and masking after a resume match the uninterrupted run. Layout:

    step-000200/model/            Hugging Face format (or a PEFT adapter) + tokenizer: plain transformers loads it
    step-000200/optimizer.pt      optimizer state (loaded with torch.load(weights_only=True)); under FSDP the
                                  full state, keyed by parameter name, gathered from every shard
    step-000200/scheduler.pt      scheduler and grad-scaler state
    step-000200/trainer_state.json  step, data-stream position, tokens seen, elapsed time
    step-000200/manifest.json     size and sha256 of every other file (written last): a checkpoint is used only
                                  when every file verifies, so a disk error, a truncation or a hand edit after
                                  the rename is found before anything is loaded
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ftk.errors import UsageError

STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    step: int = 0             # optimizer steps completed
    samples: int = 0          # position in the block stream (global samples consumed)
    tokens: int = 0           # tokens fed to the model
    elapsed: float = 0.0      # training wall time, summed over resumes
    skipped_batches: int = 0  # batches dropped for a non-finite loss
    best_eval_loss: Optional[float] = None
    extra: Dict[str, Any] = field(default_factory=dict)  # regime/recipe state (e.g. unfrozen groups)


MANIFEST = "manifest.json"
REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def step_dirs(checkpoints: Path) -> List[Path]:
    """Checkpoint folders (renamed into place, so written whole; see `damage` for what happened since), oldest
    first."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if STEP_DIR.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest(checkpoints: Path) -> Optional[Path]:
    """The newest checkpoint whose every file verifies."""
    for path in reversed(step_dirs(checkpoints)):
        if damage(path) is None:
            return path
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: Path) -> List[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: Path) -> None:
    files = {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(root)}
    (root / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def damage(path: Path) -> Optional[str]:
    """None when every file of the checkpoint is as written; else what is wrong, in a few words."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        # Written by an ftk without manifests: the files must at least be there and the state readable.
        missing = [name for name in REQUIRED if not (path / name).is_file()]
        if missing or not (path / "model").is_dir():
            return f"{(missing or ['model/'])[0]} missing"
        try:
            load_state(path)
        except (ValueError, TypeError):
            return "trainer_state.json unreadable"
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} unreadable"
    for name, expected in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} missing"
        size = f.stat().st_size
        if size != expected["size"]:
            return f"{name} is {size:,} bytes, {expected['size']:,} were written"
        if _sha256(f) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(checkpoints: Path, state: TrainState, model: Any, tokenizer: Any, optimizer: Any, scheduler: Any,
         scaler: Any, keep_last: int, extra_files: Optional[Dict[str, Any]] = None,
         gathered: Optional["Gathered"] = None) -> Path:
    """Write a complete checkpoint atomically and prune older ones; returns its directory.

    `gathered`: under FSDP, the full model and optimizer state collected by `gather` (the model and optimizer
    themselves hold only this rank's shards)."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    final = checkpoints / f"step-{state.step:07d}"
    tmp = checkpoints / f".tmp-step-{state.step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        model.save_pretrained(tmp / "model", safe_serialization=True,
                              **({"state_dict": gathered.model} if gathered else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")
        torch.save(gathered.optimizer if gathered else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "scheduler.pt")
        for name, obj in (extra_files or {}).items():
            torch.save(obj, tmp / name)
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
        write_manifest(tmp)  # last: what it lists is what was written
        _fsync_tree(tmp)
        if final.exists():  # a stale copy of the same step (e.g. re-saved after resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"could not write checkpoint {final}: {exc.strerror or exc}; free disk space and "
                         "resume with train.resume=auto (the previous checkpoint is intact)") from None
    for old in step_dirs(checkpoints)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_weights(model: Any, target: Path) -> None:
    """The model alone (e.g. the best one so far), replaced atomically: a kill never leaves half of it."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    _fsync_tree(tmp)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class Gathered:
    """Full (unsharded) state of an FSDP model and its optimizer, on rank 0's CPU."""

    model: Dict[str, Any]
    optimizer: Dict[str, Any]


def sharded(accelerator: Any) -> bool:
    """True when parameters are FSDP shards: saving and loading them are collectives over every rank."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def gather(accelerator: Any, model: Any, optimizer: Any = None) -> Optional[Gathered]:
    """Under FSDP, the full model state dict and optimizer state (keyed by parameter name), gathered to rank
    0's CPU memory; None otherwise. Every rank must call it (it is a collective); only rank 0 gets tensors."""
    if not sharded(accelerator):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # The sharded model itself, not torch.compile's wrapper: its names carry no `_orig_mod.` prefix, so the
    # tied-weight dedup below and the saved keys match the unsharded model's.
    model = accelerator.unwrap_model(model, keep_torch_compile=False)

    weights = accelerator.get_state_dict(model)  # full_state_dict, cpu_offload: rank 0 holds it, the others {}
    # Gathering gives tied parameters (lm_head = embeddings) separate copies; keep the first name only, as
    # save_pretrained does for an unsharded model, so final/ is the same file with or without FSDP.
    first: Dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            weights.pop(name, None)
    optim = {}
    if optimizer is not None:
        optim = get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer),
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return Gathered(weights, optim)


def load_optimizer(accelerator: Any, model: Any, optimizer: Any, path: Path) -> None:
    """Restore optimizer state written by `save`: plain, or (under FSDP) full by parameter name, which every
    rank reads and keeps its own shard of; so an FSDP run resumes on any number of processes."""
    state = load_tensors(path)
    by_name = bool(state.get("param_groups")) and any(
        isinstance(p, str) for group in state["param_groups"] for p in group["params"])
    if by_name != sharded(accelerator):
        written = "with" if by_name else "without"
        raise UsageError(f"checkpoint {path.parent} was written {written} hardware.strategy=fsdp; resume it "
                         f"{written} FSDP too")
    if not by_name:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state,
                             options=StateDictOptions(full_state_dict=True))


def load_state(path: Path) -> TrainState:
    return TrainState(**json.loads((path / "trainer_state.json").read_text()))


def load_tensors(path: Path) -> Any:
    """Only tensors and plain containers: never unpickle arbitrary objects from disk."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model_weights(model: torch.nn.Module, model_dir: Path) -> None:
    """Load a checkpoint's safetensors weights into an already-built model (full model or PEFT adapter)."""
    from safetensors.torch import load_file

    adapter = model_dir / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(adapter)))
        return
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise UsageError(f"{model_dir} holds no model.safetensors; the checkpoint is incomplete")
    weights: Dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise UsageError(f"checkpoint {model_dir} does not match the model: unexpected {unexpected[:3]}")
    # save_pretrained drops tied copies (e.g. lm_head = embeddings); anything else missing is a mismatch.
    pointers = {t.data_ptr() for k, t in model.state_dict().items() if k in weights}
    untied = [k for k in missing if model.state_dict()[k].data_ptr() not in pointers]
    if untied:
        raise UsageError(f"checkpoint {model_dir} does not match the model: missing {untied[:3]}")
