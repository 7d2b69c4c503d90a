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

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
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
