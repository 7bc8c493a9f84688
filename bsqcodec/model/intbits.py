"""Integer-exact inference of the second stage's bit prior (residual.BitPrior), and its export.

The bit prior gives every kept bit of a second-stage token a binary probability table from a context of
small integers that a decoder has exactly: the co-located first-stage token's bits (+-1), the token's
position in that token's patch (one-hot), its checkerboard pass, on the second pass the kept bits of its
four first-pass neighbours (+-1, 0 where not kept), and its own bit budget. Nothing in the context comes
from pixels, so tables are the same on every machine, whatever the pixel decoder rounds.

The network is the float prior's: three 1x1 layers (linear, GELU, linear, GELU, linear), here as
IntLinear layers of the main prior's arithmetic (intprior.py: int8 weights, exact products, requantized
with integer multipliers), GELU tables on the integer grid, and logits at 1/EXP_STEP nats. A bit's table
is the two-way softmax of (0, logit) through the output exp table: the likelier value gets
out_exp[0] = OUT_ONE, the other out_exp[min(|logit|, OUT_LEN)], each at least 1.
"""

from __future__ import annotations

import torch

from .intprior import EXP_STEP, MAX_IN, OUT_LEN, OUT_ONE, QMAX, IntLinear, _lookup, _quant_linear, check_tensors, exp_table, gelu_table, linear_tensors

LAYERS = ("fc1", "fc2", "fc3")


def expected_tensors(context_size: int, width: int, bits: int, prefix: str = "bits.") -> dict:
    """Every tensor of an exported bit prior: name -> (shape, dtype, least value, greatest value)."""
    i64 = torch.int64
    out = {}
    for name, n_out, n_in in (("fc1", width, context_size), ("fc2", width, width), ("fc3", bits, width)):
        out.update(linear_tensors(prefix + name, n_out, n_in))
    out[prefix + "gelu1_table"] = out[prefix + "gelu2_table"] = ((2 * QMAX + 1,), i64, -QMAX, QMAX)
    out[prefix + "out_exp_table"] = ((OUT_LEN + 1,), i64, 0, OUT_ONE)
    return out


def validate(t: dict[str, torch.Tensor], context_size: int, width: int, bits: int, prefix: str = "bits.") -> None:
    """ValueError naming the first tensor under `prefix` that is missing, extra or wrong."""
    if max(context_size, width) > MAX_IN:
        raise ValueError(f"the bit prior is wider than {MAX_IN}, too wide for exact products")
    check_tensors(expected_tensors(context_size, width, bits, prefix), {k: v for k, v in t.items() if k.startswith(prefix)})
    if int(t[prefix + "out_exp_table"][0]) < 1:
        raise ValueError(f"tensor '{prefix}out_exp_table' must start with a positive entry")


def _near(rows: slice, H: int) -> tuple[int, int, tuple[int, int]]:
    """The grid rows a, b that the tokens of `rows` see (the rows and one either side, within the grid), and
    the zero rows to pad above and below so that row 0 of the padded window is grid row rows.start - 1."""
    a, b = max(0, rows.start - 1), min(H, rows.stop + 1)
    return a, b, (int(a == rows.start), int(b == rows.stop))


def _coords(rows: slice, W: int, at: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid rows and columns (n,) of the tokens of `rows`: all in raster order, or those where `at` (a
    (rows, W) mask) is set."""
    ys = torch.arange(rows.start, rows.stop)[:, None].expand(-1, W)
    xs = torch.arange(W)[None, :].expand(rows.stop - rows.start, -1)
    return (ys[at], xs[at]) if at is not None else (ys.reshape(-1), xs.reshape(-1))


def _shaped(parts: list[torch.Tensor], rows: slice, W: int, at: torch.Tensor | None) -> torch.Tensor:
    ctx = torch.cat(parts, -1)
    return ctx if at is not None else ctx.view(rows.stop - rows.start, W, -1)


def context(base_bits: torch.Tensor, bits01: torch.Tensor, budget: torch.Tensor, ratio: int, rows: slice | None = None,
            with_budget: bool = True, kind: str = "checker", at: torch.Tensor | None = None) -> torch.Tensor:
    """The integer context of every token of rows (default: all) of the second grid, or of those tokens
    of rows where the (rows, W) mask `at` is set.

    base_bits (h, w, L1) 0/1 of the first-stage tokens; bits01 (H, W, L) 0/1 of the second-stage tokens
    (only kept bits of earlier passes are read); budget (H, W) int bits kept per token; -> (H', W, C)
    float64 integers in the float prior's order (residual.BitPrior), or (n, C) for the n tokens of `at`
    in raster order. Kind "checker": L1 first-stage signs, ratio^2 position one-hot, pass, left, right,
    up and down neighbours' kept signs (second pass only), and the budget (with_budget). Kind
    "quad3x3": see _context_quad.
    """
    H, W, L = bits01.shape
    rows = rows or slice(0, H)
    iy, ix = _coords(rows, W, at)
    if kind == "quad3x3":
        return _shaped(_context_quad(base_bits, bits01, budget, ratio, rows, iy, ix, with_budget), rows, W, at)
    r = ratio
    up = base_bits[iy // r, ix // r].double() * 2 - 1  # (n, L1)
    pos = torch.nn.functional.one_hot((iy % r) * r + ix % r, r * r).double()
    second = ((iy + ix) % 2).double()[:, None]
    a, b, (top, bottom) = _near(rows, H)  # only the rows these tokens see: a band costs its own size
    kept = (torch.arange(L)[None, None, :] < budget[a:b, :, None]).double()
    first = ((torch.arange(a, b)[:, None] + torch.arange(W)[None, :]) % 2 == 0).double()[..., None]
    s = torch.nn.functional.pad((bits01[a:b].double() * 2 - 1) * kept * first, (0, 0, 1, 1, top, bottom))
    sy, sx = iy - rows.start + 1, ix + 1  # row 1 + i, column 1 + x of s: the band's token (i, x)
    neigh = [s[sy, sx - 1], s[sy, sx + 1], s[sy - 1, sx], s[sy + 1, sx]]  # left, right, up, down
    parts = [up, pos, second, *(second * n for n in neigh)]
    if with_budget:
        parts.append(budget[iy, ix].double()[:, None])
    return _shaped(parts, rows, W, at)


def _context_quad(base_bits, bits01, budget, ratio, rows, iy, ix, with_budget) -> list[torch.Tensor]:
    """Kind quad3x3 (the parts of the context of the tokens at grid rows iy, columns ix): the 3x3
    first-stage tokens' signs around the co-located one (channel-major: entry c * 9 + 3 * (dy + 1) +
    (dx + 1), 0 outside the grid), the position one-hot, a one-hot of the token's pass
    (BitPrior.quad_pass), the kept signs of its eight neighbours (BitPrior.NEIGH8 order) that an earlier
    pass decoded (else 0), and the budget."""
    from .residual import BitPrior

    H, W, L = bits01.shape
    L1 = base_bits.shape[-1]
    r = ratio
    code = torch.nn.functional.pad(base_bits.double() * 2 - 1, (0, 0, 1, 1, 1, 1))  # (h+2, w+2, L1), 0 outside
    Y, X = iy // r + 1, ix // r + 1
    wide = torch.stack([code[Y + dy, X + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], -1)  # (n, L1, 9)
    up = wide.reshape(len(iy), L1 * 9)
    pos = torch.nn.functional.one_hot((iy % r) * r + ix % r, r * r).double()
    a, b, (top, bottom) = _near(rows, H)  # only the rows these tokens see
    ps = BitPrior.quad_pass(b - a, W, y0=a)
    kept = (torch.arange(L)[None, None, :] < budget[a:b, :, None]).double()
    s = torch.nn.functional.pad((bits01[a:b].double() * 2 - 1) * kept, (0, 0, 1, 1, top, bottom))
    pp = torch.nn.functional.pad(ps, (1, 1, top, bottom), value=4)  # row 1 + i, column 1 + x: the band's token (i, x)
    sy, sx = iy - rows.start + 1, ix + 1
    own = pp[sy, sx]
    onehot = torch.nn.functional.one_hot(own, 4).double()
    neigh = [s[sy + dy, sx + dx] * (pp[sy + dy, sx + dx] < own).double()[:, None] for dy, dx in BitPrior.NEIGH8]
    parts = [up, pos, onehot, *neigh]
    if with_budget:
        parts.append(budget[iy, ix].double()[:, None])
    return parts


class IntBitPrior:
    """The bit prior's integer path, built from exported integer tensors (names under `prefix`)."""

    def __init__(self, t: dict[str, torch.Tensor], budget: bool = True, prefix: str = "bits.", device="cpu",
                 kind: str = "checker") -> None:
        self.budget = budget  # whether the context ends with the token's budget (the model's config says)
        self.kind = kind  # the context kind (the model's config says), and with it the passes of a band
        self.layers = [IntLinear(t, prefix + n, device) for n in LAYERS]
        self.gelu = [t[f"{prefix}gelu{i}_table"].to(device=device, dtype=torch.float64) for i in (1, 2)]
        for g in self.gelu:
            if g.shape != (2 * QMAX + 1,) or float(g.abs().max()) > QMAX:
                raise ValueError("bad GELU table")
        out = t[prefix + "out_exp_table"].long()
        if out.shape != (OUT_LEN + 1,) or int(out.max()) > OUT_ONE or int(out.min()) < 0:
            raise ValueError("bad output exp table")
        self.out_exp = out.to(device)
        self.context_size = self.layers[0].wt.shape[0]
        self.bits = self.layers[2].wt.shape[1]

    @property
    def passes(self) -> int:
        from ..config import SecondConfig

        return SecondConfig.CONTEXTS[self.kind]

    def pass_grid(self, rows: slice, W: int) -> torch.Tensor:
        """(rows, W) the pass that codes each second-stage token of these grid rows: checker (y + x) mod 2;
        quad3x3 BitPrior.quad_pass."""
        from .residual import BitPrior

        if self.kind == "quad3x3":
            return BitPrior.quad_pass(rows.stop - rows.start, W, y0=rows.start)
        return (torch.arange(rows.start, rows.stop)[:, None] + torch.arange(W)[None, :]) % 2

    def context(self, base_bits, bits01, budget, ratio, rows=None, at=None) -> torch.Tensor:
        """context() of this prior's kind and budget flag."""
        return context(base_bits, bits01, budget, ratio, rows, self.budget, self.kind, at)

    def logits(self, ctx: torch.Tensor) -> torch.Tensor:
        """(..., C) context integers -> (..., L) logits of bit = 1, integers at 1/EXP_STEP nats."""
        if not ctx.numel():
            return torch.zeros(*ctx.shape[:-1], self.bits, dtype=torch.float64)
        h = ctx
        for lin, g in zip(self.layers[:2], self.gelu):
            h = lin(h).clamp_(-QMAX, QMAX)
            h = _lookup(g, h.add_(QMAX).long())
        return self.layers[2](h)

    def tables(self, ctx: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., L, 2) int64 tables (value 0, value 1) of each bit."""
        z = self.logits(ctx).clamp_(-OUT_LEN, OUT_LEN).long()
        zero = torch.where(z > 0, z, 0)  # gap of value 0: max(0, z) - 0
        one = torch.where(z > 0, 0, -z)  # gap of value 1: max(0, z) - z
        return _lookup(self.out_exp, torch.stack([zero, one], -1)).clamp_(min=1)


@torch.no_grad()
def export(prior, calib: torch.Tensor, prefix: str = "bits.") -> dict[str, torch.Tensor]:
    """Float BitPrior + calibration contexts (N, C) in the integer layout -> integer tensors for IntBitPrior.

    The integer context holds the budget as the bit count k where the float prior sees k / L: its
    weights are divided by L here.
    """
    prior = prior.float().cpu().eval()
    convs = [prior.net[0], prior.net[2], prior.net[4]]
    W = [c.weight.double()[:, :, 0, 0] for c in convs]
    b = [c.bias.double() for c in convs]
    if prior.budget:
        W[0] = torch.cat([W[0][:, :-1], W[0][:, -1:] / prior.bits], 1)
    x = calib.double()
    scales = []
    for i in range(2):  # the hidden layers' ranges on the calibration contexts
        pre = x @ W[i].t() + b[i]
        scales.append(float(pre.abs().max()) * 1.1 / QMAX)
        x = torch.nn.functional.gelu(pre)
    out: dict[str, torch.Tensor] = {}
    s_in = [1.0, scales[0], scales[1]]
    s_out = [scales[0], scales[1], 1 / EXP_STEP]
    for i, name in enumerate(LAYERS):
        _quant_linear(out, prefix + name, W[i], b[i], s_in[i], torch.full((W[i].shape[0],), s_out[i], dtype=torch.float64))
    out[prefix + "gelu1_table"] = gelu_table(scales[0])
    out[prefix + "gelu2_table"] = gelu_table(scales[1])
    out[prefix + "out_exp_table"] = exp_table(OUT_ONE, OUT_LEN)
    return out


GELU_MIN = 0.169971  # -min GELU(x), at x = -0.7518


def gelu_scale(table: torch.Tensor) -> float:
    """The scale a gelu_table was made at, read back from its entries: GELU's least value (-GELU_MIN)
    fixes it to a few percent; the scale whose GELU comes closest to the entries (least
    squares, golden-section search) then refines it."""
    lo = float(-table.min())  # round(GELU_MIN / s): GELU_MIN / s lies within half a unit of it
    if lo < 1:
        raise ValueError("GELU table too coarse to read its scale")
    grid = torch.arange(-QMAX, QMAX + 1, dtype=torch.float64)
    want = table.double()

    def err(s: float) -> float:
        x = grid * s
        return float(((0.5 * x * (1 + torch.erf(x / 2**0.5)) / s - want) ** 2).sum())

    a, b = GELU_MIN / (lo + 0.5), GELU_MIN / (lo - 0.5)
    g = (5**0.5 - 1) / 2
    for _ in range(60):
        c, d = b - g * (b - a), a + g * (b - a)
        if err(c) < err(d):
            b = d
        else:
            a = c
    return (a + b) / 2


@torch.no_grad()
def float_state(t: dict[str, torch.Tensor], budget: bool, bits: int, prefix: str = "bits.") -> dict[str, torch.Tensor]:
    """Integer tensors of an exported bit prior -> a float BitPrior state that computes about the same
    logits (export's inverse, up to its rounding): how a training run starts from a shipped model file."""
    s_hidden = [gelu_scale(t[f"{prefix}gelu{i}_table"]) for i in (1, 2)]
    s_in, s_out = [1.0, *s_hidden], [*s_hidden, 1 / EXP_STEP]
    state = {}
    for i, name in enumerate(LAYERS):
        lin = IntLinear(t, prefix + name, "cpu")
        w = lin.wt.t() * (lin.scale * s_out[i] / s_in[i])[:, None]  # (out, in)
        if i == 0 and budget:  # the float prior sees the budget as k / L, the integer one as k
            w = torch.cat([w[:, :-1], w[:, -1:] * bits], 1)
        state[f"net.{2 * i}.weight"] = w.float()[:, :, None, None].contiguous()
        state[f"net.{2 * i}.bias"] = ((lin.offset - 0.5) * s_out[i]).float()
    return state


def bits_cost(tables: torch.Tensor, bits01: torch.Tensor, kept: torch.Tensor) -> float:
    """Ideal code length in bits of the kept bits under integer tables (N, L, 2)."""
    t = tables.double()
    p = torch.gather(t, -1, bits01.long()[..., None])[..., 0] / t.sum(-1)
    return float(-(torch.log2(p) * kept).sum())

