"""The second token stage in a file (formats/bsq.md section 11): choose its tokens and budgets, and turn
them back into pixels on top of the first stage's.

The codec (codec.py) codes the first stage as always and hands this module the first stage's tokens and
pixels over the padded image. The residual coder runs in strips of second-grid rows with a halo of the
rows its convolutions see, so memory stays bounded and the strips' shapes depend only on the image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import cpu
from . import stage2
from ..model import weights
from ..format.container import Header, SecondStage
from ..errors import FormatError, ModelError
from ..model.residual import ResidualCoder, halo, to_float
from ..model.second import SecondModel
from ..model.tokenizer import native_bf16, tokens_to_bits

STRIP2 = 64  # second-grid rows per strip of the residual coder, at most
STRIP_POSITIONS = 2**16  # and at most about this many positions (wide images: narrower strips, bounded memory)


def strip_rows(W2: int) -> int:
    """Rows of a strip of the residual coder for a second grid W2 wide: a function of the image alone."""
    return max(8, min(STRIP2, STRIP_POSITIONS // max(1, W2)))


def second_bits(coder: ResidualCoder, arr: np.ndarray, base_px: np.ndarray) -> torch.Tensor:
    """The second-stage tokens' bits (H2, W2, L2) uint8 of the padded image and its first-stage pixels."""
    return (second_latent(coder, arr, base_px) > 0).to(torch.uint8)


@torch.no_grad()
def second_latent(coder: ResidualCoder, arr: np.ndarray, base_px: np.ndarray) -> torch.Tensor:
    """The residual coder's projections (H2, W2, L2) float32 of the padded image and its first-stage pixels:
    their signs are its bits."""
    p = coder.cfg.patch
    H2 = base_px.shape[0] // p
    seen = halo(coder.cfg.enc_blocks)
    rows = strip_rows(base_px.shape[1] // p)
    out = []
    for a in range(0, H2, rows):
        b = min(H2, a + rows)
        lo, hi = max(0, a - seen), min(H2, b + seen)
        code = coder.encode_latent(to_float(arr[lo * p : hi * p]), to_float(base_px[lo * p : hi * p]))
        out.append(code[0, :, a - lo : b - lo].permute(1, 2, 0))
    return torch.cat(out)


@torch.no_grad()
def pixels(smodel, base_px: np.ndarray, bits01: torch.Tensor, budget: torch.Tensor, bf16: bool | None = None) -> np.ndarray:
    """The second stage's uint8 pixels over the padded image: the first stage's plus the decoded correction.
    smodel: a SecondModel, or a look of one (look.SecondLookModel): what has its decoder (.coder, .config.residual).
    bf16: its convolutions in bfloat16 (within a level of float32's pixels, formats/bsq.md section 11);
    None: where the CPU has bfloat16 dot products, as the first stage's decoder (tokenizer.native_bf16)."""
    if bf16 is None:
        bf16 = native_bf16()
    coder, p, L = smodel.coder, smodel.config.residual.patch, smodel.config.residual.bits
    kept = torch.arange(L)[None, None, :] < budget[..., None]
    code = ((bits01.float() * 2 - 1) * kept).permute(2, 0, 1)[None] / L**0.5  # decode_code scales by sqrt(L)
    H2 = bits01.shape[0]
    seen = halo(smodel.config.residual.dec_blocks)
    rows = strip_rows(bits01.shape[1])
    out = np.empty_like(base_px)

    def strip(a: int) -> None:
        b = min(H2, a + rows)
        lo, hi = max(0, a - seen), min(H2, b + seen)
        with torch.no_grad():
            y = coder.decode_code(code[..., lo:hi, :], to_float(base_px[lo * p : hi * p]), bf16)
        y = (y[0, :, (a - lo) * p : (b - lo) * p].clamp(0, 1) * 255).round()
        out[a * p : b * p] = y.permute(1, 2, 0).to(torch.uint8).numpy()

    # strips of shapes that depend on the image alone, each on single-threaded kernels, the strips in
    # threads: the same pixels for any thread count (as the first stage's decoder, tokenizer.tokens_to_image)
    starts = list(range(0, H2, rows))
    with cpu.threads_of_kernels(min(len(starts), torch.get_num_threads())) as run:
        run(strip, starts)
    return out


def _region_sums(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.avg_pool2d(x[None, None], size, divisor_override=1)[0, 0]


def candidates(n: int, effort: int) -> list[int]:
    """The choices the encoder weighs at an effort: all of them from effort 3 up, else every other one and
    the last (half the decoder passes)."""
    return list(range(n)) if effort >= 3 else sorted(set(range(0, n, 2)) | {n - 1})


def choose_budgets(smodel: SecondModel, arr: np.ndarray, base_px: np.ndarray, base_tokens: np.ndarray, base_bits: int,
                   bits01: torch.Tensor, lam: float, width: int, height: int, among: list[int] | None = None) -> np.ndarray:
    """The budget map (one choice per first-stage token) by a rate-distortion rule, region by region.

    For each choice (of `among`, default all), every region's squared error (pixels inside the image only)
    with every token at that choice's budget, and the bits its kept bits cost under the bit prior, are
    noted; each region then takes the choice of least error + lam x bits. Each choice weighed costs one
    pass of the decoder.
    """
    cfg = smodel.config
    p = cfg.residual.patch
    H2, W2 = bits01.shape[:2]
    P = base_px.shape[0] // (base_tokens.shape[0])
    r = P // p
    inside = torch.zeros(base_px.shape[:2])
    inside[:height, :width] = 1
    x = torch.from_numpy(arr.astype(np.float32))
    b1 = tokens_to_bits(torch.as_tensor(np.asarray(base_tokens, dtype=np.int64)), base_bits)
    among = list(range(len(cfg.choices))) if among is None else among
    cost = []
    for k in (cfg.choices[c] for c in among):
        budget = torch.full((H2, W2), k)
        px = pixels(smodel, base_px, bits01, budget)  # with no bits kept, still the decoder's view of the base
        se = ((torch.from_numpy(px.astype(np.float32)) - x) ** 2).sum(-1) * inside
        bits = torch.zeros(H2, W2)
        if k:
            c0, c1 = bit_costs(smodel, b1, bits01, budget, r)
            bits = torch.where(bits01.bool(), c1, c0)[..., :k].sum(-1).float()
        cost.append(_region_sums(se, P) + lam * _region_sums(bits, r))
    return np.asarray(among)[torch.stack(cost).argmin(0).numpy()]


@torch.no_grad()
def bit_costs(smodel: SecondModel, b1: torch.Tensor, bits01: torch.Tensor, budget: torch.Tensor, r: int):
    """(cost of each bit being 0, being 1), each (H2, W2, L2) in bits, under the bit prior's tables with
    bits01 and budget as every token's context (search2.py)."""
    H2, W2 = bits01.shape[:2]
    rows = strip_rows(W2)
    tab = torch.cat([smodel.prior.tables(smodel.prior.context(b1, bits01, budget, r, slice(a, min(H2, a + rows))))
                     for a in range(0, H2, rows)]).double()
    p = tab / tab.sum(-1, keepdim=True)
    return -torch.log2(p[..., 0]), -torch.log2(p[..., 1])


def encode(smodel: SecondModel, arr: np.ndarray, base_px: np.ndarray, base_tokens: np.ndarray, base_bits: int,
           width: int, height: int, lam: float | None = None, effort: int = 4) -> tuple[SecondStage, torch.Tensor, torch.Tensor]:
    """The second stage of a file, and its tokens' bits and budgets (for its pixels): arr and base_px are the
    padded image and its first-stage pixels. The budgets are chosen for the coder's own bits; from effort 2
    the search (search2.py) then chooses the kept bits for those budgets."""
    from . import search2

    cfg = smodel.config
    latent = second_latent(smodel.coder, arr, base_px)
    bits01 = (latent > 0).to(torch.uint8)
    lam = cfg.lam if lam is None else lam
    pick = choose_budgets(smodel, arr, base_px, base_tokens, base_bits, bits01, lam, width, height,
                          candidates(len(cfg.choices), effort))
    r = base_px.shape[0] // base_tokens.shape[0] // cfg.residual.patch
    budget = stage2.budgets(pick, cfg.choices, r)
    steps = search2.iterations(effort)
    if steps:
        b1 = tokens_to_bits(torch.as_tensor(np.asarray(base_tokens, dtype=np.int64)), base_bits)
        costs = bit_costs(smodel, b1, bits01, budget, r)
        bits01 = search2.refine(smodel.coder, torch.nn.functional.normalize(latent, dim=-1), arr, base_px, budget,
                                costs, lam, steps, width, height)
    table = stage2.map_table(pick, len(cfg.choices))
    streams = stage2.encode(smodel.prior, base_tokens, base_bits, bits01, pick, cfg.choices, r, table)
    crc = stage2.token_crc(bits01, budget)
    return SecondStage(cfg.residual.patch, cfg.residual.bits, table, smodel.sha256[:16], crc, streams), bits01, budget


def find_model(header: Header, base, models=None) -> SecondModel:
    """The second-stage model a 2.1 file names, checked against its first stage and the file's geometry."""
    s = header.second
    smodel = weights.find(s.model_hash, header.preset, models)
    if not isinstance(smodel, SecondModel):
        raise ModelError(f"the file's second stage names model {smodel.name!r}, which is not a second-stage model")
    if smodel.base_hash != header.model_hash[:16]:
        raise FormatError(f"the second-stage model {smodel.name!r} is for another first stage")
    cfg = smodel.config
    if (s.patch, s.bits, len(s.table)) != (cfg.residual.patch, cfg.residual.bits, len(cfg.choices)) or not smodel.fits(base):
        raise FormatError("second-stage geometry does not match its model")
    return smodel


def decode_tokens(header: Header, base, base_tokens: np.ndarray, models=None) -> tuple[SecondModel, torch.Tensor, torch.Tensor]:
    """A 2.1 file's second stage -> (its model, bits (H2, W2, L2) with bits not kept 0, budgets (H2, W2)), verified."""
    smodel = find_model(header, base, models)
    return (smodel, *_decode_bits(header, smodel, base_tokens))


def _decode_bits(header: Header, smodel: SecondModel, base_tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    cfg, s = smodel.config, header.second
    r = header.patch // cfg.residual.patch
    # single-threaded kernels (the tables are integers, the same for any thread count): a product split
    # between threads waits for every thread, which a busy machine schedules late
    with cpu.single_threaded_kernels():
        bits01, budget = stage2.decode(smodel.prior, base_tokens, header.bits, s.streams, s.table, cfg.choices, r,
                                       cfg.residual.bits)
    if stage2.token_crc(bits01, budget) != s.token_crc:
        raise FormatError("the decoded second-stage tokens do not match the file's second-stage token checksum")
    return bits01, budget


def decode(header: Header, base_tokens: np.ndarray, base_px: Callable[[], np.ndarray], smodel: SecondModel,
           pixels_of=None) -> np.ndarray:
    """The uint8 pixels (padded image) of a 2.1 file's second stage, whose model is smodel (find_model).
    base_px() makes the first stage's pixels; the second stage's bits are decoded in a thread meanwhile (their
    tables never depend on pixels, section 11: the bits' single-threaded work beside the pixels' two threads).
    pixels_of: whose decoder gives them (a look of smodel; None: its own)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        bits = pool.submit(_decode_bits, header, smodel, base_tokens)
        base = base_px()
        return pixels(pixels_of or smodel, base, *bits.result())
