"""Running the integer prior token by token over a batch of tiles, with a KV cache.

The decoder and the sampler share this loop; they differ only in how a symbol is chosen from its
probability table (range decoding, or sampling).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..model.intprior import IntPrior
from ..model.intstep import stepper

# choose(tile_index_in_batch, position, group, earlier_groups_of_this_token, table) -> symbol
Choose = Callable[[int, int, int, np.ndarray, np.ndarray], int]


def run_tiles(ip: IntPrior, shapes: list[tuple[int, int]], choose: Choose,
              on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Symbols (B, T, G) of B tiles of the given (rows, cols) shapes, chosen symbol by symbol."""
    with torch.inference_mode():  # no autograd bookkeeping: each of the many small operations is cheaper
        return _run(ip, shapes, choose, on_step)


def _run(ip: IntPrior, shapes, choose, on_step) -> torch.Tensor:
    G = ip.cfg.groups
    lens = np.array([r * c for r, c in shapes])
    B, T = len(shapes), int(lens.max())
    cols = np.array([c for _, c in shapes])
    step = stepper(ip, B, T)
    out = np.zeros((B, T, G), dtype=np.int64)
    prev = None
    for t in range(T):
        active = [b for b in range(B) if t < lens[b]]
        tt = np.where(t < lens, t, 0)  # finished tiles compute a dummy position
        h = step.hidden(step.embed(prev, tt // cols, tt % cols), t)
        cur = out[:, t]
        for j in range(G):
            tab = step.table(h, j, cur[:, :j])
            for b in active:
                cur[b, j] = choose(b, t, j, cur[b, :j], tab[b])
        prev = cur
        if on_step is not None:
            on_step(t, len(active))
    return torch.from_numpy(out)
