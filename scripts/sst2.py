"""SST-2 as ../shared/data holds it ("<0|1> <sentence>" lines) -> jsonl records ftk reads."""

from __future__ import annotations

import json
from pathlib import Path

NAMES = {"0": "negative", "1": "positive"}


def to_jsonl(source: Path, target: Path) -> Path:
    """{"text", "label"} records (labels named, so the model config and prompts read "negative"/"positive")."""
    with open(source, encoding="utf-8", errors="replace") as lines, open(target, "w") as out:
        for line in lines:
            label, _, text = line.strip().partition(" ")
            if text:
                out.write(json.dumps({"text": text, "label": NAMES[label]}) + "\n")
    return target
