"""The valid range of every numeric config field, declared once next to its default, checked in one place.

    seed: int = ranged(0, ge=0, le=SEED_MAX)

`ranged` is a dataclass field whose metadata holds the bounds; `check(cfg)` walks any composed schema
(the dataclass type of each node, from OmegaConf.get_type) and raises a UsageError naming the first value
out of its range, and the range. Every float must also be finite: `train.lr=inf` is refused like 0.
`None` (where the field is Optional) means "unset" and is always allowed; a list of numbers is checked
element by element. A string is never empty (`data.path=` is a typo, not a path). This module imports only omegaconf.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from ftk.errors import UsageError

SEED_MAX = 2**32 - 1  # numpy's (and so accelerate.set_seed's) limit


@dataclass(frozen=True)
class Range:
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    def violation(self, value: float) -> Optional[str]:
        """The bound `value` breaks ("must be < 1"), or None."""
        if self.ge is not None and not value >= self.ge:
            return f"must be >= {_num(self.ge)}"
        if self.gt is not None and not value > self.gt:
            return f"must be > {_num(self.gt)}"
        if self.le is not None and not value <= self.le:
            return f"must be <= {_num(self.le)}"
        if self.lt is not None and not value < self.lt:
            return f"must be < {_num(self.lt)}"
        return None

    def describe(self) -> str:
        """The interval in math notation: [0, 1), (0, inf), [1, inf)."""
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else "(-inf"
        high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else "inf)"
        return f"{low}, {high}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def ranged(default: Any = dataclasses.MISSING, *, ge: Optional[float] = None, gt: Optional[float] = None,
           le: Optional[float] = None, lt: Optional[float] = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a default and the range its value must lie in."""
    meta = {"range": Range(ge=ge, gt=gt, le=le, lt=lt)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check(cfg: Any, prefix: str = "") -> None:
    """Raise UsageError for the first numeric value of `cfg` (a composed structured config) out of range."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    schema = OmegaConf.get_type(cfg)
    fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
    for key in cfg.keys():
        if OmegaConf.is_missing(cfg, key):
            continue
        value, name = cfg.get(key), f"{prefix}{key}"
        if isinstance(value, DictConfig):
            check(value, f"{name}.")
            continue
        bounds = fields[key].metadata.get("range") if key in fields else None
        for v in (list(value) if isinstance(value, ListConfig) else [value]):
            _check_one(name, v, bounds)


def _check_one(name: str, value: Any, bounds: Optional[Range]) -> None:
    if isinstance(value, str) and not value.strip():
        # `data.path=` would read the working folder, `adapter_path=` pick the newest run: never what was meant
        raise UsageError(f"{name} is empty; pass {name}=<value>, or leave it out for the default")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        where = f" (set it in {bounds.describe()})" if bounds else ""
        raise UsageError(f"{name}={value} is not a finite number{where}")
    if bounds is None:
        return
    broken = bounds.violation(value)
    if broken:
        raise UsageError(f"{name}={value} is out of range: {broken} (set it in {bounds.describe()})")
