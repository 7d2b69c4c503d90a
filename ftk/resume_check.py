"""What a resumed run must share with its checkpoint, and what happens when it does not.

A checkpoint records the settings it was trained with (`settings`: model, objective, regime, data and a
fingerprint of its files, optimizer and schedule, batch). A resume that changes any of them would silently
mix two runs (the optimizer state even keeps the old learning rate), so it is refused with one line naming the
keys, unless the user asks for the change with train.accept_changes=true: then it is applied from the
checkpoint's step on and recorded in <run>/resumes.jsonl. Keys that only say how long or how visibly to train
(max_steps, max_minutes, logging, evaluation, saving) may change freely: extending a run is a resume.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ftk.errors import UsageError

# train.* keys that decide what is learned; the others (max_steps, log_every, save_every, ...) may change.
TRAIN_KEYS = ("batch_size", "seq_len", "lr", "min_lr_ratio", "warmup_steps", "schedule", "weight_decay", "beta1",
              "beta2", "eps", "max_grad_norm", "seed")
GROUPS = ("model", "objective", "regime", "data", "forgetting")
# How the same computation is run or read, not what it learns: may change between resumes.
IGNORED = ("data.cache_dir", "data.test_path", "model.attn_implementation", "model.trust_remote_code")
LOG = "resumes.jsonl"


def _flat(prefix: str, value: Any, out: Dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def _data_fingerprint(path: Optional[str]) -> Optional[str]:
    """Changes when a local data file is added, removed or modified (size, mtime); hub names stand for
    themselves; None is the embedded corpus."""
    from ftk.data import sources

    if path is None or not sources.is_local(path) or not Path(path).expanduser().exists():
        return None
    return sources.files_fingerprint(sources.list_files(path))


def settings(cfg: Any, **extra: Any) -> Dict[str, Any]:
    """The flat {dotted key: value} a checkpoint is trained with."""
    from omegaconf import OmegaConf

    out: Dict[str, Any] = {}
    for group in GROUPS:
        if group in cfg:
            _flat(group, OmegaConf.to_container(cfg[group], resolve=True, enum_to_str=True), out)
    for key in TRAIN_KEYS:
        out[f"train.{key}"] = OmegaConf.to_container(cfg.train, resolve=True, enum_to_str=True)[key]
    for key in ("path", "validation_path"):
        if cfg.data.get(key) is not None:
            out[f"data.{key} (contents)"] = _data_fingerprint(cfg.data[key])
    for key in IGNORED:
        out.pop(key, None)
    out.update(extra)
    return out


def changes(saved: Dict[str, Any], now: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    return {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}


def _show(key: str, old: Any, new: Any) -> str:
    if key.endswith(("(contents)", "(fingerprint)")):
        return f"{key} changed"
    return f"{key} {old} -> {new}"


def describe(found: Dict[str, Tuple[Any, Any]], limit: int = 6) -> str:
    listed = "; ".join(_show(k, old, new) for k, (old, new) in list(found.items())[:limit])
    return listed + (f" (+{len(found) - limit} more)" if len(found) > limit else "")


def check(checkpoint_dir: Path, now: Dict[str, Any], accept: bool, run_dir: Path) -> Dict[str, Tuple[Any, Any]]:
    """The changes from the checkpoint's settings to `now`: refused (UsageError) unless `accept`; accepted ones
    are appended to <run>/resumes.jsonl. A checkpoint of an ftk that recorded no settings is not compared."""
    from ftk import checkpoint

    saved = checkpoint.load_state(checkpoint_dir).extra.get("settings")
    if saved is None:
        return {}
    found = changes(saved, now)
    if not found:
        return {}
    if not accept:
        raise UsageError(f"this resume changes what {checkpoint_dir} was trained with: {describe(found)}; resume with "
                         "the same settings, or add train.accept_changes=true to apply the changes from here on "
                         "(recorded in resumes.jsonl)")
    if int(os.environ.get("RANK", "0")) != 0:
        return found
    with open(run_dir / LOG, "a") as handle:
        handle.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": str(checkpoint_dir),
                                 "step": checkpoint.load_state(checkpoint_dir).step,
                                 "changes": {k: [old, new] for k, (old, new) in found.items()}}, default=str) + "\n")
    return found
