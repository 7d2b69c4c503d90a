"""Where the parts of a transformers model are, for any family: embeddings, blocks, top, new head.

Found from the model itself rather than a table of names: the blocks are the ModuleList with one
entry per layer; parameters registered before it are the embeddings, after it the top (final norm,
untied LM head); the new head is what loading reported as freshly initialised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List

import torch


@dataclass
class Parts:
    embeddings: List[str]
    blocks: List[List[str]]  # parameter names per block, bottom to top
    top: List[str]           # after the last block, excluding the new head (e.g. ln_f)
    head: List[str]          # the new task head

    def all(self) -> List[str]:
        return [*self.embeddings, *(n for b in self.blocks for n in b), *self.top, *self.head]


def block_list_name(model: torch.nn.Module) -> str:
    layers = getattr(model.config, "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == layers]
    if not found:
        raise ValueError(f"cannot find the {layers} transformer blocks of {type(model).__name__}")
    return found[0][0]


def parts(model: torch.nn.Module, new_head: Iterable[str]) -> Parts:
    head = set(new_head)
    prefix = block_list_name(model) + "."
    embeddings, top = [], []
    blocks: dict = {}
    seen_block = False
    for name, _ in model.named_parameters():
        if name in head:
            continue
        if name.startswith(prefix):
            index = int(name[len(prefix):].split(".", 1)[0])
            blocks.setdefault(index, []).append(name)
            seen_block = True
        elif seen_block:
            top.append(name)
        else:
            embeddings.append(name)
    return Parts(embeddings, [blocks[i] for i in sorted(blocks)], top,
                 [n for n, _ in model.named_parameters() if n in head])


def set_trainable(model: torch.nn.Module, names: Iterable[str]) -> None:
    """requires_grad on exactly `names`; every other parameter frozen."""
    wanted = set(names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)


def head_modules(new_head: Iterable[str]) -> List[str]:
    """Module paths holding the new head's parameters (for peft's modules_to_save)."""
    return sorted({name.rsplit(".", 1)[0] for name in new_head})
