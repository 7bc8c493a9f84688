"""Sampling images from the prior: unconditional generation and completion of a kept top part.

Tiles are independent under the prior (each is its own stream), so an image larger than one tile is
sampled as a mosaic of independent tiles. The default size is one tile.
"""

from __future__ import annotations

import numpy as np
import torch

from . import codec
from ..format import container
from ..model import weights
from .autoregress import run_tiles
from ..errors import BsqError
from ..model.tokenizer import join_groups, split_groups


class Sampler:
    """Chooses symbols from integer tables with temperature, top-k and top-p; seeded."""

    def __init__(self, seed: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
        if temperature < 0 or not (0 < top_p <= 1) or top_k < 0:
            raise BsqError("need temperature >= 0, 0 < top-p <= 1 and top-k >= 0")
        self.rng = np.random.default_rng(seed)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, table: np.ndarray) -> int:
        p = table.astype(np.float64)
        if self.temperature == 0 or self.top_k == 1:
            return int(np.argmax(p))  # greedy; ties go to the lowest symbol
        logp = np.log(p / p.sum()) / self.temperature
        order = np.argsort(-logp, kind="stable")  # most likely first, ties by symbol
        if self.top_k:
            order = order[: self.top_k]
        q = np.exp(logp[order] - logp[order[0]])
        q /= q.sum()
        if self.top_p < 1:
            keep = int(np.searchsorted(np.cumsum(q), self.top_p) + 1)
            order, q = order[:keep], q[:keep] / q[:keep].sum()
        return int(order[self.rng.choice(len(order), p=q)])


def _grid_tiles(model: weights.Model, rows: int, cols: int) -> list[tuple[slice, slice]]:
    p = model.config.prior
    return [(slice(r, min(rows, r + p.tile_rows)), slice(c, min(cols, c + p.tile_cols)))
            for r in range(0, rows, p.tile_rows) for c in range(0, cols, p.tile_cols)]


def sample_tokens(model: weights.Model, rows: int, cols: int, sampler: Sampler | list[Sampler],
                  known: torch.Tensor | None = None, keep_rows: int = 0, progress=None, count: int = 1) -> torch.Tensor:
    """Token grids (count, rows, cols), sampled in one batch with one sampler per grid.

    Token rows < keep_rows are taken from `known` (rows, cols) instead of sampled. Each grid's
    sampler is called in the same order whatever `count` is, so a seed gives the same grid.
    """
    cfg = model.config.prior
    samplers = sampler if isinstance(sampler, list) else [sampler] * count
    count = len(samplers)
    slices = _grid_tiles(model, rows, cols)
    shapes = [(rs.stop - rs.start, cs.stop - cs.start) for rs, cs in slices] * count
    forced = []
    for rs, cs in slices:
        if known is not None and rs.start < keep_rows:
            k = known[rs, cs]
            forced.append((split_groups(k.reshape(-1), cfg.bits, cfg.groups), (min(keep_rows, rs.stop) - rs.start) * k.shape[1]))
        else:
            forced.append((None, 0))
    total = sum(r * c for r, c in shapes)
    done = 0
    n_tiles = len(slices)

    def choose(b, t, j, earlier, table):
        sym, n = forced[b % n_tiles]
        if t < n:
            return int(sym[t, j])
        return samplers[b // n_tiles](table)

    def on_step(t, n_active):
        nonlocal done
        done += n_active
        if progress and t % 16 == 15:
            progress("sample", done, total)

    tokens = torch.zeros(count, rows, cols, dtype=torch.int64)
    for k in range(0, len(shapes), codec.DEFAULT_BATCH_TILES):  # bounded memory: a batch of tiles at a time
        part = range(k, min(len(shapes), k + codec.DEFAULT_BATCH_TILES))
        out = run_tiles(model.prior, [shapes[b] for b in part], lambda i, t, j, e, tab: choose(part[i], t, j, e, tab), on_step)
        for i, b in enumerate(part):
            r, c = shapes[b]
            rs, cs = slices[b % n_tiles]
            tokens[b // n_tiles, rs, cs] = join_groups(out[i, : r * c], cfg.bits).reshape(r, c)
    if progress:
        progress("sample", total, total)
    return tokens if isinstance(sampler, list) or count > 1 else tokens[0]


def generate(model: weights.Model, n: int, width: int, height: int, seed: int = 0, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, progress=None) -> list[np.ndarray]:
    """n sampled images of width x height pixels, (H, W, 3) uint8 each (all of them within the pixel budget)."""
    container.check_pixels(width, height * n, None, f"{n} images of {width}x{height}")
    p = model.config.tokenizer.patch
    rows, cols = -(-height // p), -(-width // p)
    samplers = [Sampler(seed * 1_000_003 + i, temperature, top_k, top_p) for i in range(n)]
    toks = sample_tokens(model, rows, cols, samplers, progress=progress)
    return [codec.tokens_to_array(model, t, width, height) for t in toks]


def complete(model: weights.Model, arr: np.ndarray, keep: float, n: int = 1, seed: int = 0, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, progress=None) -> tuple[torch.Tensor, list[torch.Tensor], list[np.ndarray]]:
    """Keep the top `keep` fraction of token rows of arr, sample the rest: (tokens, completions' tokens, images)."""
    if not 0 <= keep <= 1:
        raise BsqError("--keep must be between 0 and 1")
    known = codec.image_to_tokens(model, arr)
    rows, cols = known.shape
    keep_rows = round(keep * rows)
    samplers = [Sampler(seed * 1_000_003 + i, temperature, top_k, top_p) for i in range(n)]
    toks = list(sample_tokens(model, rows, cols, samplers, known, keep_rows, progress))
    return known, toks, [codec.tokens_to_array(model, t, arr.shape[1], arr.shape[0]) for t in toks]


def grid(images: list[np.ndarray], columns: int | None = None, pad: int = 4) -> np.ndarray:
    """Images of one size side by side (in rows of `columns`), separated by white lines."""
    h, w = images[0].shape[:2]
    columns = columns or min(len(images), 8)
    nrows = -(-len(images) // columns)
    out = np.full((nrows * h + (nrows - 1) * pad, columns * w + (columns - 1) * pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        out[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = im
    return out
