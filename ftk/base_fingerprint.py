"""Which base an adapter belongs to, by its weights rather than its path or shape.

`ftk finetune` records the fingerprint of the base's weights in ftk_finetune.json; `ftk merge-adapter` and
`ftk evaluate` compare it with the base they are given. Another pretrain of the same shape at the same or another
path loads without error and gives wrong results silently (a merge of such a pair scores like chance), so a
different fingerprint is refused unless the user insists with allow_other_base=true. The same weights copied
elsewhere have the same fingerprint and pass.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

from ftk.errors import UsageError


def fingerprint(model: str) -> Optional[str]:
    """sha256 over every tensor (name, dtype, shape, bytes) of a local model directory's safetensors files, in
    name order: independent of sharding and file layout. None for a hub name or a folder without safetensors
    (then nothing can be compared)."""
    folder = Path(model).expanduser()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = sorted((key, i) for i, h in enumerate(handles) for key in h.keys())
    for key, i in where:
        tensor = handles[i].get_tensor(key).contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check(adapter: Path, record: dict, base: str, allow: bool, say=None) -> Optional[bool]:
    """Refuse (one line) a base whose weights are not those the adapter was trained on, unless `allow`.
    Returns whether it matched (None when the adapter recorded no fingerprint or the base has none)."""
    expected = record.get("base_fingerprint")
    if not expected:
        return None
    actual = fingerprint(base)
    if actual is None:
        return None
    if actual == expected:
        return True
    trained_on = record.get("base_model") or "?"
    if not allow:
        raise UsageError(f"model.name_or_path={base} is not the base the adapter {adapter} was trained on "
                         f"({trained_on}): its weights differ (fingerprint {actual[:12]}, the adapter's base "
                         f"{expected[:12]}); pass that base, or allow_other_base=true to use this one anyway")
    if say is not None:
        say(f"allow_other_base=true: {base} is not the base the adapter was trained on ({trained_on}); results "
            "may be meaningless")
    return False
