"""The second token stage's streams: (budget map, second-stage bits) <-> bytes (formats/bsq.md, section 11).

The budget map holds one choice per first-stage token (a region of r x r second-stage tokens, r = P / P2);
a token keeps the first choices[map] bits of its L2. The map is one stream under the file's table. The
kept bits are coded band by band (BAND2 rows of second-stage tokens) in passes: with the checker context
two checkerboard passes, pass 0 (tokens with even row + column) first for every band, then pass 1; with
the quad3x3 context four passes over the 2x2 lattice (IntBitPrior.pass_grid). Each bit is coded under the
integer bit prior's table for it (intbits.py). Tables of a pass depend only on the first-stage tokens and
on earlier passes' bits, so every table of a band's pass is computed at once, and the streams of one pass
are independent of each other.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from ..format import entropy
from ..format.container import BAND2
from ..errors import FormatError
from ..model.intbits import IntBitPrior
from ..model.residual import BitPrior
from ..model.tokenizer import bits_to_tokens, tokens_to_bits


def budgets(region_choice: np.ndarray, choices, ratio: int) -> torch.Tensor:
    """(h, w) indices into choices -> (h * ratio, w * ratio) bits kept per second-stage token."""
    k = np.asarray(choices, dtype=np.int64)[np.asarray(region_choice)]
    return torch.from_numpy(k.repeat(ratio, 0).repeat(ratio, 1))


def map_table(region_choice: np.ndarray, n: int) -> list[int]:
    """The budget map's table as an encoder writes it: each choice's count, at least 1."""
    return [max(1, int(c)) for c in np.bincount(np.asarray(region_choice).ravel(), minlength=n)]


def second_tokens(bits01: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """(H, W) int64: each second-stage token's bit count times 2^32 plus its kept bits (the first bit most
    significant, bits not kept 0) -- what the token CRC covers."""
    kept = torch.arange(bits01.shape[-1])[None, None, :] < budget[..., None]
    return bits_to_tokens(bits01.long() * kept) + budget.long() * 2**32


def token_crc(bits01: torch.Tensor, budget: torch.Tensor) -> int:
    """CRC-32 of the second-stage tokens in raster order, each a little-endian u64 (second_tokens), so that
    it also checks the budget map."""
    return zlib.crc32(np.ascontiguousarray(second_tokens(bits01, budget).numpy().astype("<u8")).tobytes())


def _pass_tables(prior: IntBitPrior, b1: torch.Tensor, bits01: torch.Tensor, budget: torch.Tensor, ratio: int,
                 band: int, p: int) -> tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What pass p of a band codes: (its rows, the (rows, W) mask of its tokens that keep bits, their (n, L)
    mask of kept bits, and the (n, L, 2) tables of those tokens' bits); stream order is raster order of the
    tokens, then bit order. Contexts and tables are computed for those tokens only."""
    H, W, L = bits01.shape
    rows = slice(band * BAND2, min(H, (band + 1) * BAND2))
    coded = (prior.pass_grid(rows, W) == p) & (budget[rows] > 0)
    kept = torch.arange(L)[None, :] < budget[rows][coded][:, None]
    ctx = prior.context(b1, bits01, budget, ratio, rows, at=coded)
    return rows, coded, kept, prior.tables(ctx)


def encode(prior: IntBitPrior, base_tokens: np.ndarray, base_bits: int, bits01: torch.Tensor, region_choice: np.ndarray,
           choices, ratio: int, table: list[int]) -> list[bytes]:
    """Streams of the second stage: the map's, then pass 0 of every band, then pass 1 of every band, and so on
    for the prior's passes (trimmed).

    bits01 (H, W, L2) 0/1, the second-stage tokens' bits (those not kept are not read)."""
    H, W, L = bits01.shape
    b1 = tokens_to_bits(torch.as_tensor(np.asarray(base_tokens, dtype=np.int64)), base_bits)
    budget = budgets(region_choice, choices, ratio)
    rc = np.asarray(region_choice).ravel()
    streams = [entropy.encode(rc, np.tile(np.asarray(table, np.float64), (len(rc), 1)), trimmed=True)]
    for p in range(prior.passes):
        for band in range(-(-H // BAND2)):
            rows, coded, kept, tab = _pass_tables(prior, b1, bits01, budget, ratio, band, p)
            streams.append(entropy.encode(bits01[rows][coded][kept].numpy(), tab[kept].numpy(), trimmed=True))
    return streams


def decode(prior: IntBitPrior, base_tokens: np.ndarray, base_bits: int, streams: list[bytes], table: list[int],
           choices, ratio: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The streams of encode() -> (bits01 (H, W, L) with bits not kept 0, budget (H, W)); each stream is verified."""
    h, w = np.asarray(base_tokens).shape
    H, W = h * ratio, w * ratio
    if len(table) != len(choices):
        raise FormatError(f"the budget-map table has {len(table)} entries, the second-stage model {len(choices)} choices")
    nb = -(-H // BAND2)
    if len(streams) != 1 + prior.passes * nb:
        raise FormatError(f"the file codes the second stage in {(len(streams) - 1) // nb} passes, "
                          f"its second-stage model in {prior.passes}")
    try:
        rc = entropy.decode(streams[0], np.tile(np.asarray(table, np.float64), (h * w, 1)), trimmed=True).reshape(h, w)
    except FormatError as e:
        raise FormatError(f"second stage, budget map: {e}") from None
    b1 = tokens_to_bits(torch.as_tensor(np.asarray(base_tokens, dtype=np.int64)), base_bits)
    budget = budgets(rc, choices, ratio)
    bits01 = torch.zeros(H, W, L, dtype=torch.uint8)
    if prior.context_size != BitPrior.context_size(base_bits, ratio, L, prior.budget, prior.kind) or prior.bits != L:
        raise FormatError("the second-stage model does not fit the file's token geometry")
    for p in range(prior.passes):
        for band in range(nb):
            rows, coded, kept, tab = _pass_tables(prior, b1, bits01, budget, ratio, band, p)
            try:
                sym = entropy.decode(streams[1 + p * nb + band], tab[kept].numpy(), trimmed=True)
            except FormatError as e:
                raise FormatError(f"second stage, pass {p} of band {band}: {e}") from None
            got = torch.zeros(kept.shape, dtype=torch.uint8)
            got[kept] = torch.from_numpy(sym.astype(np.uint8))
            bits01[rows][coded] = got
    return bits01, budget
