"""Running the integer prior token by token over a batch of tiles, with a KV cache.

The decoder and the sampler share this loop; they differ only in how a symbol is chosen from its
probability table (range decoding, or sampling).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .intprior import IntPrior

# choose(tile_index_in_batch, position, group, earlier_groups_of_this_token, table) -> symbol
Choose = Callable[[int, int, int, np.ndarray, np.ndarray], int]


def run_tiles(ip: IntPrior, shapes: list[tuple[int, int]], choose: Choose,
              on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Symbols (B, T, G) of B tiles of the given (rows, cols) shapes, chosen symbol by symbol."""
    with torch.inference_mode():  # no autograd bookkeeping: each of the many small operations is cheaper
        return _run(ip, shapes, choose, on_step)


def _run(ip: IntPrior, shapes, choose, on_step) -> torch.Tensor:
    G = ip.cfg.groups
    lens = [r * c for r, c in shapes]
    B, T = len(shapes), max(lens)
    cols = torch.tensor([c for _, c in shapes])
    lens_t = torch.tensor(lens)
    cache = ip.new_cache(B, T)
    out = torch.zeros(B, T, G, dtype=torch.int64)
    prev = None
    for t in range(T):
        active = [b for b in range(B) if t < lens[b]]
        tt = torch.where(torch.full((B,), t) < lens_t, t, 0)  # finished tiles compute a dummy position
        rows_t, cols_t = torch.div(tt, cols, rounding_mode="floor"), tt % cols
        x = ip.embed(prev, rows_t[:, None].to(ip.device), cols_t[:, None].to(ip.device))
        if prev is None:
            x = x.expand(B, 1, -1)
        h = ip.hidden(x, cache, t)[:, 0]
        cur = np.zeros((B, G), dtype=np.int64)
        for j in range(G):
            earlier = torch.from_numpy(cur[:, :j]).to(ip.device) if j else None
            tab = ip.group_table(h, j, earlier).cpu().numpy().astype(np.float64)
            for b in active:
                cur[b, j] = choose(b, t, j, cur[b, :j], tab[b])
        cur_t = torch.from_numpy(cur)
        out[:, t] = cur_t
        prev = cur_t[:, None].to(ip.device)
        if on_step is not None:
            on_step(t, len(active))
    return out
