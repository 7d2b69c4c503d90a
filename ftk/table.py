"""A table of named rows (regimes, objectives): lookup by name with one clear error, and the default settings of
a row as a structured config. Torch-free."""

from __future__ import annotations

from typing import Any, Dict, Generic, Iterable, Tuple, TypeVar

Row = TypeVar("Row")


class Table(Generic[Row]):
    def __init__(self, kind: str, rows: Iterable[Row]):
        self.kind = kind
        self.rows: Tuple[Row, ...] = tuple(rows)
        self.by_name: Dict[str, Row] = {row.name: row for row in self.rows}  # type: ignore[attr-defined]
        self.names: Tuple[str, ...] = tuple(self.by_name)

    def facts(self, name: Any) -> Row:
        """The row named `name` (a str or anything with a `.value`, e.g. an Enum member)."""
        key = getattr(name, "value", name)
        try:
            return self.by_name[key]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {key!r}; {self.kind}s: {', '.join(self.names)}") from None

    def settings_of(self, name: str) -> Any:
        """The default settings of row `name`, as a structured config (what `<kind>=<name>` composes to)."""
        from omegaconf import OmegaConf

        return OmegaConf.structured(self.facts(name).settings)  # type: ignore[attr-defined]
