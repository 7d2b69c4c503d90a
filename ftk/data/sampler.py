"""The order in which training blocks are consumed, addressable by position.

The stream is an endless sequence of epochs, each a permutation of all blocks seeded by
(seed, epoch). Sample `i` of the stream is computed directly, so resuming at a position costs
nothing however many steps were done, and no block is re-read or skipped.
"""

from __future__ import annotations

import numpy as np


class BlockStream:
    def __init__(self, n_blocks: int, seed: int):
        if n_blocks <= 0:
            raise ValueError("BlockStream needs at least one block")
        self.n_blocks, self.seed = n_blocks, seed
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _arrange(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:  # one epoch's order is kept: consecutive reads fall in the same epoch
            self._epoch, self._order = epoch, self._arrange(epoch)
        return self._order

    def take(self, start: int, count: int) -> np.ndarray:
        """Block indices at stream positions start .. start+count-1."""
        out = np.empty(count, dtype=np.int64)
        for k in range(count):
            epoch, offset = divmod(start + k, self.n_blocks)
            out[k] = self._permutation(epoch)[offset]
        return out

    def epoch_at(self, position: int) -> float:
        return position / self.n_blocks


class LengthGroupedStream(BlockStream):
    """BlockStream's contract (seeded epochs, sample `i` computed directly, so resuming is exact and O(1)) for
    variable-length examples, arranged so that a batch holds examples of similar length.

    The loop pads each micro-batch to its own longest example; drawn at random, a batch of mixed lengths pays
    for padding on every short example. Here each epoch's permutation is cut into mega-chunks of `mega`
    groups, each chunk is sorted by length and cut into groups of `group` consecutive positions, and the
    groups are shuffled (the scheme of Hugging Face's LengthGroupedSampler). Groups are aligned on stream
    positions that are multiples of `group`; the loop passes its global batch, and every step starts at a
    multiple of it, so one step is one group and each rank's micro-batches are consecutive slices of it. The group holding the longest example comes first in its epoch: a batch
    that does not fit in memory fails at the first step, not hours in.
    """

    MEGA = 50  # groups per sorted chunk (Hugging Face's LengthGroupedSampler uses 50 batches too)

    def __init__(self, lengths, seed: int, group: int, mega: int = MEGA, jitter: float = 0.15):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) == 0:
            raise ValueError("LengthGroupedStream needs at least one example")
        if group < 1 or mega < 1:
            raise ValueError("LengthGroupedStream: group and mega must be at least 1")
        self.n_blocks, self.seed, self.group, self.mega, self.jitter = len(self.lengths), seed, group, mega, jitter
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _arrange(self, epoch: int) -> np.ndarray:
        n, g = self.n_blocks, self.group
        rng = np.random.default_rng([self.seed, epoch, 1])
        perm = rng.permutation(n)
        # When n is not a multiple of the group, an epoch starts mid-group: its first `phase` positions close the
        # group the previous epoch's last examples opened, so every later group is still aligned.
        phase = min((-epoch * n) % g, n)
        head, rest = perm[:phase], perm[phase:]
        groups = []
        chunk = g * self.mega
        # Sorted by length up to a random factor of +-jitter: examples of nearly equal length still mix, so a batch
        # is not all of one kind where length goes with the label (a class word of more tokens, say); strictly
        # sorted batches trained a small classification task measurably worse (tests/test_finetune.py).
        key = self.lengths[rest] * np.exp(rng.uniform(-self.jitter, self.jitter, len(rest)))
        for start in range(0, len(rest), chunk):
            part = rest[start:start + chunk]
            part = part[np.argsort(key[start:start + chunk], kind="stable")]
            groups += [part[i:i + g] for i in range(0, len(part), g)]
        # A short last group runs into the next epoch's head: it stays last so that the alignment holds.
        tail = [groups.pop()] if groups and len(groups[-1]) < g else []
        if groups:
            groups = [groups[i] for i in rng.permutation(len(groups))]
            longest = max(range(len(groups)), key=lambda i: int(self.lengths[groups[i]].max()))
            groups[0], groups[longest] = groups[longest], groups[0]
        return np.concatenate([head, *groups, *tail]).astype(np.int64)

