"""Gradients DDP does not average: parameters unfrozen after the model was wrapped.

DistributedDataParallel registers with its reducer only the parameters that require a gradient when it is
built (torch/nn/parallel/distributed.py, `_build_params_for_reducer`). Regimes that unfreeze during training
(gradual_unfreeze, head_then_full) turn more on later: their gradients then stay local to each process, the
replicas drift apart without an error, and rank 0 saves its own copy. This averages those gradients over the
processes after the last micro-batch of each step, in one flat all-reduce per dtype, so every replica applies
the same update. FSDP2 needs none of this: it re-reads requires_grad each time it gathers a block.
"""

from __future__ import annotations

from typing import Any, List, Set

import torch


class LateUnfrozenSync:
    def __init__(self, prepared: Any, plain: torch.nn.Module):
        ddp = getattr(prepared, "_orig_mod", prepared)  # torch.compile wraps the DDP module
        self.active = isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        # What the reducer was built with: the parameters that required a gradient at wrapping time.
        self.registered: Set[int] = {id(p) for p in plain.parameters() if p.requires_grad} if self.active else set()
        self.plain = plain

    def late(self) -> List[torch.nn.Parameter]:
        seen: Set[int] = set()
        out = []
        for p in self.plain.parameters():
            if p.requires_grad and p.grad is not None and id(p) not in self.registered and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def __call__(self) -> int:
        """Average the late-unfrozen gradients over the processes; returns how many tensors were averaged."""
        if not self.active:
            return 0
        import torch.distributed as dist

        late = self.late()
        world = dist.get_world_size()
        by_dtype: dict = {}
        for p in late:
            by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        # Every rank unfreezes on the same step (the schedule is a function of the step), so every rank
        # reaches this collective with the same list of tensors.
        for grads in by_dtype.values():
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat /= world
            for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                grad.copy_(synced)
        return len(late)
