"""Integer-exact inference of the prior, and its export from the float model.

Every value that reaches the entropy coder is an integer computed by operations that give the same
result on every IEEE 754 machine, in any order and any batching:
- matrix products are on integers whose partial sums stay below 2^53 (float64) or, where operands
  are split into small digits, below 2^24 (float32): exact whatever the summation order;
- reductions (sums) are over integers whose totals stay below 2^53 (exact in float64);
- everything else is an element-wise +, -, *, /, sqrt or floor, which IEEE 754 rounds correctly;
- non-linearities (exp, GELU) are lookup tables stored in the model file.
So one teacher-forced pass, a token-by-token pass with the KV cache, any batch of tiles, any thread
count and any device give bit-identical probability tables. Integers are held in float64 tensors
(exact up to 2^53); lookup indices are int64.

Fixed-point conventions:
- residual stream: real = int / 2^FRAC, clamped to +-RES_MAX
- LayerNorm output: real = int / LN_SCALE, clamped to +-QMAX (gain and bias are folded into the next linear)
- linear: acc = x @ W^T (W int8 per output channel), y = floor((acc * M + 2^(s-1)) / 2^s) + b, M < 2^23
- attention: exp table indexed by the rounded logit gap times EXP_STEP; rounded weighted mean
- output: probability tables from a second exp table, each entry at least 1
"""

from __future__ import annotations

import math

import torch

from ..config import INTPRIOR_VERSION, PriorConfig

# The arithmetic below is the versioned definition in formats/intprior.md. Any change to a constant, a
# rounding or an operation's order that alters a table is a new version: model files name the version
# they were exported for ("intprior" metadata) and a model of another version is refused.
VERSION = INTPRIOR_VERSION

FRAC = 10
RES_MAX = 2**20  # |x| <= 2^20 keeps sum((x - mean)^2) below 2^53 for dim <= 1024
LN_SCALE = 256
QMAX = 2047
EXP_STEP = 256  # exp table entries per unit of logit
ATT_LEN = 12 * EXP_STEP  # attention: beyond a gap of 12 nats the weight is 0
ATT_ONE = 2**12 - 1  # attention weights fit in three base-16 digits
OUT_LEN = 24 * EXP_STEP  # output tables: beyond a gap of 24 nats a symbol gets the floor of 1
OUT_ONE = 2**20
QUERY_BLOCK = 32  # teacher-forced attention works on this many query positions at a time (speed only)
MAX_KEYS = 512  # 15 * QMAX * MAX_KEYS < 2^24: exactness bound of the weighted sum
MAX_IN = 4096  # widest linear input (the float64 product stays far below 2^53)
LN_EPS = float(round(1e-5 * 4**FRAC))  # LayerNorm epsilon in squared residual units (part of the format)
CLAMP_GAP = float(2**30)
MULT_BITS = 23  # multipliers M < 2^23, so |acc * M| < 2^53 for |acc| < 2^30
_INT_MM = hasattr(torch, "_int_mm")  # exact int8 products on the CPU (fast only with int8 dot products: product_path)
F32_MAX_IN = 2**24 // (63 * 128)  # 2,080: the widest input whose base-64 digit products are exact in float32
PRODUCTS_ENV = "BSQ_PRODUCTS"  # int8, float32 or float64: force that path of the products where it applies
PATHS = ("int8", "float32", "float64")


def exp_table(one: int, length: int) -> torch.Tensor:
    """round(one * exp(-i / EXP_STEP)) for i < length, then a final 0."""
    t = [round(one * math.exp(-i / EXP_STEP)) for i in range(length)] + [0]
    return torch.tensor(t, dtype=torch.int64)


def gelu_table(scale: float) -> torch.Tensor:
    """GELU on the integer grid [-QMAX, QMAX] at `scale`, output on the same grid."""
    out = []
    for i in range(-QMAX, QMAX + 1):
        x = i * scale
        out.append(round(0.5 * x * (1 + math.erf(x / math.sqrt(2))) / scale))
    return torch.tensor(out, dtype=torch.int64)


def _multiplier(m: torch.Tensor, bits: int = MULT_BITS) -> tuple[torch.Tensor, int]:
    """Real multipliers m (>0) -> integers M and a shift s with M / 2^s ~ m and M < 2^bits."""
    top = float(m.max())
    s = max(0, min(60, bits - 1 - math.ceil(math.log2(max(top, 1e-30)))))
    return torch.round(m.double() * 2.0**s).long(), s


def _scale(M: torch.Tensor | float, s: int) -> torch.Tensor | float:
    """M / 2^s as a float64: exact, since M < 2^23 is an integer and 2^-s a power of two."""
    return M * 2.0**-s


def _requant(acc: torch.Tensor, scale, offset) -> torch.Tensor:
    """floor(acc * M / 2^s + offset) with scale = M / 2^s, on float64 integers.

    Exact: |acc| < 2^30 and M < 2^23, so acc * scale has at most 53 significant bits, and adding an
    offset that is an integer plus 1/2 stays within them. With offset = b + 1/2 this is
    round-half-up(acc * M / 2^s) + b.
    """
    return torch.floor(acc * scale + offset)


# ----------------------------------------------------------------------------------------------
# integer layers


def int_layernorm(x: torch.Tensor) -> torch.Tensor:
    """Residual integers (..., D) -> normalized integers at LN_SCALE, clamped to +-QMAX."""
    D = x.shape[-1]
    # floor(sum / D) for an exact integer sum (|x| <= 2^20, D <= 1024): floor division gives the same integer
    c = x - torch.div(x.sum(-1, keepdim=True), D, rounding_mode="floor")
    var = torch.linalg.vecdot(c, c).unsqueeze(-1) / D  # an exact sum in any order: c^2 <= 2^42
    n = torch.round(c * float(LN_SCALE) / torch.sqrt(var + LN_EPS))
    return n.clamp_(-QMAX, QMAX)


def _lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table[idx] for an int64 index tensor: rows of table (1-D: entries), by index_select (cheaper)."""
    return table.index_select(0, idx.reshape(-1)).view(*idx.shape, *table.shape[1:])


def _split64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integers |x| <= QMAX -> (hi, lo) with x = 64 * hi + lo, |hi| <= 32, 0 <= lo < 64."""
    hi = torch.div(x, 64, rounding_mode="floor")
    return hi, torch.add(x, hi, alpha=-64)


F32_EXACT = float(2**24)  # every integer up to this magnitude is a float32


def one_f32_product(row_l1: float, x_max: float, w_max: float, col_l1: float) -> bool:
    """Whether one float32 product of x (rows of L1 norm at most row_l1, entries at most x_max in
    magnitude) with integer weights (entries at most w_max, columns of L1 norm at most col_l1) is exact.

    Every partial sum of row b's products with column j, in any order, is at most
    sum_i |x_bi| |w_ij|, which is at most both row_l1 * w_max and x_max * col_l1. When the smaller is
    at most 2^24, every partial sum is an integer that float32 holds exactly, so the product equals
    the digits' (LayerNorm outputs are mostly far below QMAX: most batches qualify).
    """
    return min(row_l1 * w_max, x_max * col_l1) <= F32_EXACT


def product_path(n_in: int, device) -> str:
    """The fastest exact path for the products of a linear layer n_in wide (every path gives the same integers).

    int8: torch's int8 products of base-64 digits, fast only where the CPU has int8 dot products (VNNI,
    AMX; elsewhere oneDNN emulates them, 10-40x slower than float32). float32: the same digits as
    float32 products, exact up to F32_MAX_IN inputs. float64: the plain product. Other devices take
    float64 (a GPU may round float32 products through TF32). PRODUCTS_ENV forces a path where it applies.
    """
    import os

    from .. import cpu

    forced = os.environ.get(PRODUCTS_ENV, "")
    if forced and forced not in PATHS:
        raise ValueError(f"{PRODUCTS_ENV} must be one of {', '.join(PATHS)}, not {forced!r}")
    if torch.device(device).type != "cpu":
        return "float64"
    int8_ok = _INT_MM
    float32_ok = n_in <= F32_MAX_IN and torch.get_float32_matmul_precision() == "highest"
    if forced == "int8" and int8_ok or forced == "float32" and float32_ok or forced == "float64":
        return forced
    if int8_ok and cpu.has_any(cpu.INT8_FLAGS):
        return "int8"
    return "float32" if float32_ok else "float64"


class IntLinear:
    def __init__(self, t: dict, name: str, device) -> None:
        w = t[f"{name}.w"]
        if w.shape[1] > MAX_IN:
            raise ValueError("linear layer too wide for exact products")
        self.wt = w.t().contiguous().to(device=device, dtype=torch.float64)  # int8 values, (in, out)
        m = t[f"{name}.m"].to(device=device, dtype=torch.float64)
        if float(m.abs().max()) >= 2**MULT_BITS:
            raise ValueError("multiplier out of range")
        self.scale = _scale(m, int(t[f"{name}.s"].item()))
        self.offset = t[f"{name}.b"].to(device=device, dtype=torch.float64) + 0.5
        aw = self.wt.abs()
        self.w_max = float(aw.max()) if aw.numel() else 0.0  # bounds for one_f32_product
        self.col_l1 = float(aw.sum(0).max()) if aw.numel() else 0.0
        self.use(product_path(w.shape[1], self.wt.device))

    def use(self, path: str) -> None:
        """Compute the products by this path (see product_path); the weights it needs are made once."""
        if path not in PATHS or path != "float64" and self.wt.device.type != "cpu":
            raise ValueError(f"no {path} products on {self.wt.device}")
        if path == "int8" and not _INT_MM or path == "float32" and self.wt.shape[0] > F32_MAX_IN:
            raise ValueError(f"no exact {path} products for this layer here")
        self.path = path
        # fresh (in, out) arrays with the default strides: _int_mm misreads odd ones, and .contiguous() keeps
        # any stride of a size-1 dimension (a 1-input layer's (1, out) weights as (1, 1): garbage on VNNI CPUs)
        self.w8 = torch.empty(self.wt.shape, dtype=torch.int8).copy_(self.wt) if path == "int8" else None
        self.w32 = self.wt.float().contiguous() if path == "float32" else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: float64 integers with |x| <= QMAX, shape (..., in).

        The product is exact whatever the summation order. In float64: every partial sum is an
        integer below QMAX * 127 * MAX_IN < 2^30. In float32, x itself where one_f32_product proves
        it exact; otherwise split into base-64 digits (x = 64 hi + lo,
        |hi| <= 32, 0 <= lo < 64), each digit's products summed over n inputs stay below 63 * 128 * n:
        below 2^31 in int32 for any n <= MAX_IN, below 2^24 in float32 for n <= F32_MAX_IN. The digits'
        sums are recombined in float64.
        """
        if self.path == "float64":
            return _requant(torch.matmul(x, self.wt), self.scale, self.offset)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        n = x2.shape[0]
        if self.path == "int8":
            xi = x2.to(torch.int16)
            r = torch._int_mm(torch.cat([xi >> 6, xi & 63]).to(torch.int8), self.w8)  # arithmetic shift: floor(x / 64)
        else:
            ax = x2.abs()
            if n and one_f32_product(float(ax.sum(-1).max()), float(ax.max()), self.w_max, self.col_l1):
                acc = torch.matmul(x2.float(), self.w32).double()
                return torch.addcmul(self.offset, acc, self.scale).floor_().view(*lead, -1)
            hi, lo = _split64(x2)
            r = torch.matmul(torch.cat([hi, lo]).float(), self.w32)
        acc = torch.add(r[n:].double(), r[:n].double(), alpha=64)  # |acc| < 2047 * 128 * 4096 < 2^31: exact
        # _requant in one operation: acc * scale is exact, so a fused multiply-add rounds just as the sum does
        return torch.addcmul(self.offset, acc, self.scale).floor_().view(*lead, -1)


def _exact_dots(q: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """q @ K^T for integer float32 tensors, |q|, |K| <= QMAX, head size <= 128, as float64.

    q is split into base-64 digits so that every partial sum stays below 2^24 (63 * 2047 * 128 < 2^24);
    both digits go through one matrix product, so K is read once.
    """
    T = q.shape[-2]
    hi, lo = _split64(q)
    r = torch.matmul(torch.cat([hi, lo], -2), K.transpose(-1, -2)).double()
    return r[..., :T, :] * 64 + r[..., T:, :]


class KVCache:
    """Preallocated keys and values of every layer: (layers, B, heads, T, head size), integers in
    float32 or float64 (both hold them exactly)."""

    def __init__(self, layers: int, B: int, heads: int, T: int, hs: int, device, dtype=torch.float32) -> None:
        self.k = torch.zeros(layers, B, heads, T, hs, dtype=dtype, device=device)
        # values carry an extra column of ones, so that attention sums its weights in the same product
        self.v = torch.ones(layers, B, heads, T, hs + 1, dtype=dtype, device=device)

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        self.k[layer, :, :, pos : pos + T] = k
        self.v[layer, :, :, pos : pos + T, :-1] = v
        return self.k[layer, :, :, : pos + T], self.v[layer, :, :, : pos + T]


def expected_tensors(cfg: PriorConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype, float, float]]:
    """Every tensor of an exported prior: name -> (shape, dtype, least value, greatest value).

    IntPrior accepts exactly these: the bounds are the ones its exactness arguments rely on
    (shifts s >= 2 keep acc * M / 2^s + b + 1/2 below 2^52, so the rounding is exact).
    """
    D, n, G = cfg.dim, 2**cfg.group_bits, cfg.groups
    H = cfg.mlp_ratio * D
    i64 = torch.int64
    emb = (-RES_MAX, RES_MAX)
    out = {
        "tok_emb": ((G * n, D), i64, *emb), "start": ((D,), i64, *emb), "row_emb": ((cfg.tile_rows, D), i64, *emb),
        "col_emb": ((cfg.tile_cols, D), i64, *emb), "cond_emb": ((max(1, (G - 1) * n), D), i64, *emb),
        "att_exp_table": ((ATT_LEN + 1,), i64, 0, ATT_ONE), "out_exp_table": ((OUT_LEN + 1,), i64, 0, OUT_ONE),
    }

    def linear(name: str, n_out: int, n_in: int) -> None:
        out.update(linear_tensors(name, n_out, n_in))

    for i in range(cfg.layers):
        p = f"blocks.{i}."
        linear(p + "qkv", 3 * D, D)
        linear(p + "proj", D, D)
        linear(p + "fc1", H, D)
        linear(p + "fc2", D, H)
        out[p + "gelu_table"] = ((2 * QMAX + 1,), i64, -QMAX, QMAX)
        out[p + "att_m"] = ((), i64, 1, 2**22 - 1)
        out[p + "att_s"] = ((), i64, 2, 60)
    for j in range(G):
        linear(f"heads.{j}", n, D)
    return out


def linear_tensors(name: str, n_out: int, n_in: int) -> dict[str, tuple[tuple[int, ...], torch.dtype, float, float]]:
    """The tensors of one IntLinear layer and their bounds (as expected_tensors gives them)."""
    i64 = torch.int64
    return {f"{name}.w": ((n_out, n_in), torch.int8, -127, 127), f"{name}.m": ((n_out,), i64, 1, 2**MULT_BITS - 1),
            f"{name}.s": ((), i64, 2, 60), f"{name}.b": ((n_out,), i64, -(2**31), 2**31)}


def validate(cfg: PriorConfig, t: dict[str, torch.Tensor]) -> None:
    """ValueError naming the first tensor that is missing, extra, or of the wrong shape, dtype or range."""
    if cfg.dim * cfg.mlp_ratio > MAX_IN:
        raise ValueError(f"the MLP is wider than {MAX_IN}, too wide for exact products")
    check_tensors(expected_tensors(cfg), t)
    if int(t["att_exp_table"][0]) < 1:  # the largest dot's weight: attention never divides by 0
        raise ValueError("tensor 'att_exp_table' must start with a positive weight")


def check_tensors(want: dict, t: dict[str, torch.Tensor]) -> None:
    """ValueError naming the first tensor of `want` (name -> shape, dtype, bounds) that t lacks or holds wrongly,
    or the first tensor of t that `want` does not name."""
    extra = sorted(set(t) - set(want))
    if extra:
        raise ValueError(f"unexpected tensor {extra[0]!r}")
    for name, (shape, dtype, lo, hi) in want.items():
        if name not in t:
            raise ValueError(f"missing tensor {name!r}")
        v = t[name]
        if tuple(v.shape) != shape or v.dtype != dtype:
            raise ValueError(f"tensor {name!r} is {v.dtype} {tuple(v.shape)}, not {dtype} {shape}")
        least, most = torch.aminmax(v) if v.numel() else (lo, hi)
        if int(least) < lo or int(most) > hi:
            raise ValueError(f"tensor {name!r} has values outside {lo}..{hi}")


class IntPrior:
    """The prior's integer-exact inference path; built from exported integer tensors."""

    def __init__(self, cfg: PriorConfig, t: dict[str, torch.Tensor], device="cpu") -> None:
        validate(cfg, t)
        self.cfg = cfg
        self.device = torch.device(device)
        dev = self.device
        f64 = dict(device=dev, dtype=torch.float64)
        self.n = 2**cfg.group_bits
        self.tok_emb = t["tok_emb"].to(**f64)
        self.start = t["start"].to(**f64)
        self.row_emb = t["row_emb"].to(**f64)
        self.col_emb = t["col_emb"].to(**f64)
        self.cond_emb = t["cond_emb"].to(**f64)
        att = t["att_exp_table"].long()
        if att.shape != (ATT_LEN + 1,) or int(att.max()) > ATT_ONE or int(att.min()) < 0:
            raise ValueError("bad attention exp table")
        # base-16 digits of the attention weights, most significant first, and a 1 for their sum
        # (ATT_LEN + 1, 3): one gather gives the three digits of each weight
        self.att_digits_t = torch.stack([(att // 16**i) % 16 for i in (2, 1, 0)], 1).to(device=dev, dtype=torch.float32)
        self.att_w = att.to(device=dev, dtype=torch.float64)  # the weights themselves, for float64 products
        # the KV cache: float64 on the CPU, whose float64 products are fast (one product instead of
        # the digits' two and three); float32 elsewhere (a GPU's float64 is slow)
        self.kv_dtype = torch.float64 if dev.type == "cpu" else torch.float32
        self.att_radix = torch.tensor([[256.0, 16.0, 1.0]], dtype=torch.float64, device=dev)  # digits -> weights
        out = t["out_exp_table"].long()
        if out.shape != (OUT_LEN + 1,) or int(out.max()) > OUT_ONE or int(out.min()) < 0:
            raise ValueError("bad output exp table")
        self.out_exp = out.to(dev)
        self.layers = []
        for i in range(cfg.layers):
            p = f"blocks.{i}."
            self.layers.append(
                {
                    "qkv": IntLinear(t, p + "qkv", dev),
                    "proj": IntLinear(t, p + "proj", dev),
                    "fc1": IntLinear(t, p + "fc1", dev),
                    "fc2": IntLinear(t, p + "fc2", dev),
                    "gelu": t[p + "gelu_table"].to(**f64),
                    "att_scale": _scale(float(t[p + "att_m"].item()), int(t[p + "att_s"].item())),
                }
            )
        self.heads = [IntLinear(t, f"heads.{j}", dev) for j in range(cfg.groups)]

    # -- embeddings --------------------------------------------------------------------------
    def embed(self, prev_sym: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Inputs of positions whose previous token has symbols prev_sym (B, T, G); None = start."""
        pos = self.row_emb[rows] + self.col_emb[cols]  # (B, T, D) or (T, D)
        if prev_sym is None:
            return (self.start + pos).clamp(-RES_MAX, RES_MAX)
        offs = torch.arange(self.cfg.groups, device=self.device) * self.n
        return (self.tok_emb[prev_sym + offs].sum(-2) + pos).clamp(-RES_MAX, RES_MAX)

    def inputs_for(self, sym: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Teacher-forced inputs for all positions: sym (B, T, G) -> (B, T, D)."""
        B, T, _ = sym.shape
        start = self.embed(None, rows[:1], cols[:1]).expand(B, 1, -1)
        rest = self.embed(sym[:, :-1], rows[1:], cols[1:])
        return torch.cat([start, rest], 1)

    # -- transformer ---------------------------------------------------------------------------
    def _attend(self, q, K, V, L, pos: int) -> torch.Tensor:
        """Integer attention: q (B, nh, T, hs); K, V (B, nh, pos+T, hs) -> (B, nh, T, hs).

        Many query positions (teacher forcing) go in blocks of QUERY_BLOCK rows, each with only the
        keys up to its last position: a later key would get weight exactly 0 and never be the
        largest dot, so leaving it out changes nothing, and it saves work and memory.
        """
        T = q.shape[-2]
        exact64 = K.dtype == torch.float64  # the CPU's cache: one float64 product each, exact (below 2^53)
        if T == 1 and not exact64:
            return self._attend_one(q, K, V, L)
        if T > QUERY_BLOCK:
            outs = [self._attend(q[..., a : a + QUERY_BLOCK, :], K[..., : pos + min(T, a + QUERY_BLOCK), :],
                                 V[..., : pos + min(T, a + QUERY_BLOCK), :], L, pos + a) for a in range(0, T, QUERY_BLOCK)]
            return torch.cat(outs, -2)
        if exact64:
            return self._attend64(q, K, V, L, pos)
        dots = _exact_dots(q, K)  # (B, nh, T, pos+T)
        # teacher forcing: later keys are masked out, so that it matches the one-by-one path
        mask = torch.ones(T, pos + T, dtype=torch.bool, device=self.device).tril(pos)
        dots = dots.masked_fill(~mask, -math.inf)  # never the maximum: each row keeps its diagonal
        gap = (dots.amax(-1, keepdim=True) - dots).clamp(max=CLAMP_GAP)
        idx = _requant(gap, L["att_scale"], 0.5).clamp(max=ATT_LEN).long()
        idx = idx.masked_fill(~mask, ATT_LEN)  # weight exactly 0 (the table's last entry), whatever the scale
        B, nh = idx.shape[:2]
        keys = idx.shape[-1]
        digits = _lookup(self.att_digits_t, idx).transpose(-1, -2).reshape(B, nh, 3 * T, keys)  # rows (T, digit)
        # V's last column is 1, so the product also sums the weights; exact: 15 * 2047 * 512 < 2^24
        return self._weighted_mean(torch.matmul(digits, V).double().view(B, nh, T, 3, -1))[..., 0, :]

    def _attend64(self, q, K, V, L, pos: int) -> torch.Tensor:
        """_attend's integers for a float64 cache (the CPU's), by the same operations in place: one float64
        product for the dots (|q.k| <= QMAX^2 * 128) and one for the weighted sums (<= ATT_ONE * QMAX *
        MAX_KEYS), both exact. A later key's dot is -inf, so its gap is +inf and its index ATT_LEN: weight
        exactly 0, whatever the scale; only the last T keys can be later than a query."""
        T = q.shape[-2]
        dots = torch.matmul(q, K.transpose(-1, -2))  # (B, nh, T, pos+T)
        if T > 1:
            later = torch.ones(T, T, dtype=torch.bool, device=self.device).triu(1)
            dots[..., pos:].masked_fill_(later, -math.inf)  # never the maximum: each row keeps its diagonal
        top = dots.amax(-1, keepdim=True)
        idx = dots.neg_().add_(top).mul_(L["att_scale"]).add_(0.5).floor_().clamp_(max=ATT_LEN).long()  # _requant's
        return self._rounded_mean(torch.matmul(_lookup(self.att_w, idx), V))

    def _attend_one(self, q, K, V, L) -> torch.Tensor:
        """_attend for one query position of a float32 cache (devices other than the CPU): the same
        integers with fewer operations. The cache is read once per product (the cache's size sets the
        speed of decoding): q's two base-64 digits share one product with K, the weights' three
        base-16 digits one with V, all exact below 2^24 as in _attend; nothing is masked, since
        every cached key is earlier.
        """
        return self._attend_one_torch(q, K, V, L["att_scale"])

    def _attend_one_torch(self, q, K, V, att_scale: float) -> torch.Tensor:
        hi, lo = _split64(q)
        r = torch.matmul(torch.cat([hi, lo], -2), K.transpose(-1, -2)).double()  # (B, nh, 2, keys)
        dots = torch.add(r[..., 1:, :], r[..., :1, :], alpha=64)
        # |dots| <= 2047^2 * 128, so gaps stay within CLAMP_GAP (that clamp is for masked keys only); the
        # gap times the scale is exact and, plus 1/2, positive: truncation to int64 is its floor
        gap = torch.sub(dots.amax(-1, keepdim=True), dots)
        idx = gap.mul_(att_scale).add_(0.5).clamp_(max=ATT_LEN).long()  # (B, nh, 1, keys)
        digits = _lookup(self.att_digits_t, idx[..., 0, :]).transpose(-1, -2)  # (B, nh, 3, keys)
        return self._weighted_mean(torch.matmul(digits, V).double())

    def _weighted_mean(self, r: torch.Tensor) -> torch.Tensor:
        """Products of the weights' three base-16 digits with V, (..., 3, hs + 1) -> (..., 1, hs).

        V's last column is 1, so r[..., -1] sums the weights. The digits recombine as 256 r0 + 16 r1
        + r2 (exact, below 2^33); the result is the rounded weighted mean, at v's scale.
        """
        return self._rounded_mean(torch.matmul(self.att_radix, r))

    def _rounded_mean(self, r: torch.Tensor) -> torch.Tensor:
        """Sums of weight * v with the weights' sum last, (..., hs + 1) -> the weighted mean (..., hs) at v's
        scale, rounded half up: floor((2 p + q) / 2q), exact for these integers (intprior.md section 1)."""
        pv, wsum = r[..., :-1], r[..., -1:]
        return torch.add(wsum, pv, alpha=2).div_(wsum * 2).floor_()

    def hidden(self, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        """Residual integers x (B, T, D) of positions pos..pos+T-1 -> outputs (B, T, D); fills the cache."""
        B, T, C = x.shape
        H = self.cfg.heads
        hs = C // H
        for li, L in enumerate(self.layers):
            qkv = L["qkv"](int_layernorm(x)).clamp_(-QMAX, QMAX).to(self.kv_dtype)  # either holds these exactly
            q, k, v = qkv.split(C, dim=2)
            q = q.view(B, T, H, hs).transpose(1, 2)  # (B, nh, T, hs)
            k = k.view(B, T, H, hs).transpose(1, 2)
            v = v.view(B, T, H, hs).transpose(1, 2)
            K, V = cache.update(li, pos, k, v)  # (B, nh, pos+T, hs)
            o = self._attend(q, K, V, L, pos).transpose(1, 2).reshape(B, T, C)
            x = (x + L["proj"](o)).clamp_(-RES_MAX, RES_MAX)
            h = L["fc1"](int_layernorm(x)).clamp_(-QMAX, QMAX)
            g = _lookup(L["gelu"], h.add_(QMAX).long())  # integers: the conversion is exact
            x = (x + L["fc2"](g)).clamp_(-RES_MAX, RES_MAX)
        return x

    def group_table(self, h: torch.Tensor, j: int, earlier: torch.Tensor | None) -> torch.Tensor:
        """Integer probability table (..., 2^g) int64 of group j given h (..., D) and earlier groups (..., j)."""
        z = h
        for k in range(j):
            z = z + self.cond_emb[earlier[..., k] + k * self.n]
        logits = self.heads[j](int_layernorm(z))  # logits at scale 1/EXP_STEP
        gap = (logits.amax(-1, keepdim=True) - logits).clamp(max=OUT_LEN)
        return _lookup(self.out_exp, gap.long()).clamp(min=1)

    # -- whole tiles ------------------------------------------------------------------------
    def new_cache(self, B: int, T: int) -> KVCache:
        if T > MAX_KEYS:
            raise ValueError(f"at most {MAX_KEYS} tokens per tile")
        C = self.cfg.dim
        return KVCache(self.cfg.layers, B, self.cfg.heads, T, C // self.cfg.heads, self.device, self.kv_dtype)

    def tables(self, sym: torch.Tensor, rows: int, cols: int) -> list[torch.Tensor]:
        """Teacher-forced tables for B tiles of one shape: sym (B, T, G) -> list over groups of (B, T, n)."""
        B, T, G = sym.shape
        t = torch.arange(T, device=self.device)
        rr, cc = torch.div(t, cols, rounding_mode="floor"), t % cols
        sym = sym.to(self.device)
        x = self.inputs_for(sym, rr, cc)
        h = self.hidden(x, self.new_cache(B, T), 0)
        return [self.group_table(h, j, sym[..., :j] if j else None) for j in range(G)]


# ----------------------------------------------------------------------------------------------
# export from the float prior


def _fold_ln(ln, lin) -> tuple[torch.Tensor, torch.Tensor]:
    W = lin.weight.double() * ln.weight.double()[None, :]
    b = lin.bias.double() + lin.weight.double() @ ln.bias.double()
    return W, b


def _quant_linear(out: dict, name: str, W: torch.Tensor, b: torch.Tensor, s_in: float, s_out: torch.Tensor) -> None:
    """Store W (out, in) as int8 per row with a multiplier taking acc to scale s_out (per row)."""
    sw = W.abs().amax(1).clamp(min=1e-12) / 127
    Wq = torch.round(W / sw[:, None]).clamp(-127, 127)
    M, s = _multiplier(sw * s_in / s_out)
    out[f"{name}.w"] = Wq.to(torch.int8)
    out[f"{name}.m"] = M
    out[f"{name}.s"] = torch.tensor(s, dtype=torch.int64)
    out[f"{name}.b"] = torch.round(b / s_out).long()


@torch.no_grad()
def calibrate(prior, tokens: torch.Tensor) -> list[dict[str, float]]:
    """Max magnitudes of q, k, v and the MLP hidden layer per block on calibration tokens."""
    stats = [dict(q=1e-6, k=1e-6, v=1e-6, h=1e-6) for _ in prior.blocks]
    hooks = []
    C = prior.cfg.dim
    for i, blk in enumerate(prior.blocks):
        def qkv_hook(_m, _i, o, i=i):
            q, k, v = o.split(C, dim=-1)
            for name, t in (("q", q), ("k", k), ("v", v)):
                stats[i][name] = max(stats[i][name], float(t.abs().max()))

        def fc1_hook(_m, _i, o, i=i):
            stats[i]["h"] = max(stats[i]["h"], float(o.abs().max()))

        hooks.append(blk.attn.qkv.register_forward_hook(qkv_hook))
        hooks.append(blk.fc1.register_forward_hook(fc1_hook))
    try:
        for i in range(0, len(tokens), 16):
            prior(tokens[i : i + 16])
    finally:
        for h in hooks:
            h.remove()
    return stats


@torch.no_grad()
def export(prior, calib_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float Prior + calibration tokens (B, r, c) -> dict of integer tensors for IntPrior."""
    prior = prior.float().cpu().eval()
    cfg = prior.cfg
    C, H = cfg.dim, cfg.heads
    hs = C // H
    res = 2.0**-FRAC
    out: dict[str, torch.Tensor] = {}
    q_emb = lambda w: torch.round(w.double() / res).long()  # noqa: E731
    out["tok_emb"] = q_emb(prior.tok_emb.weight)
    out["start"] = q_emb(prior.start)
    out["row_emb"] = q_emb(prior.row_emb.weight)
    out["col_emb"] = q_emb(prior.col_emb.weight)
    out["cond_emb"] = q_emb(prior.cond_emb.weight)
    out["att_exp_table"] = exp_table(ATT_ONE, ATT_LEN)
    out["out_exp_table"] = exp_table(OUT_ONE, OUT_LEN)
    stats = calibrate(prior, calib_tokens)
    for i, blk in enumerate(prior.blocks):
        p = f"blocks.{i}."
        st = {k: v * 1.1 / QMAX for k, v in stats[i].items()}
        W, b = _fold_ln(blk.ln1, blk.attn.qkv)
        s_qkv = torch.cat([torch.full((C,), st[k], dtype=torch.float64) for k in "qkv"])
        _quant_linear(out, p + "qkv", W, b, 1 / LN_SCALE, s_qkv)
        _quant_linear(out, p + "proj", blk.attn.proj.weight.double(), blk.attn.proj.bias.double(), st["v"],
                      torch.full((C,), res, dtype=torch.float64))
        W, b = _fold_ln(blk.ln2, blk.fc1)
        _quant_linear(out, p + "fc1", W, b, 1 / LN_SCALE, torch.full((W.shape[0],), st["h"], dtype=torch.float64))
        out[p + "gelu_table"] = gelu_table(st["h"])
        _quant_linear(out, p + "fc2", blk.fc2.weight.double(), blk.fc2.bias.double(), st["h"],
                      torch.full((C,), res, dtype=torch.float64))
        # attention: exp-table index = gap * q_scale * k_scale / sqrt(hs) * EXP_STEP
        # gap <= 2^30 and M < 2^22 keep gap * M below 2^53
        M, s = _multiplier(torch.tensor([st["q"] * st["k"] / math.sqrt(hs) * EXP_STEP]), bits=22)
        out[p + "att_m"] = M[0].clone()
        out[p + "att_s"] = torch.tensor(s, dtype=torch.int64)
    n = 2**cfg.group_bits
    for j in range(cfg.groups):
        W, b = _fold_ln(prior.head_ln[j], prior.heads[j])
        _quant_linear(out, f"heads.{j}", W, b, 1 / LN_SCALE, torch.full((n,), 1 / EXP_STEP, dtype=torch.float64))
    return out


# ----------------------------------------------------------------------------------------------
# back to a float prior (to train on from shipped weights)


def _gelu_scale(table: torch.Tensor) -> float:
    """The real value st of one integer unit of a block's MLP, recovered from its GELU table
    (gelu_table(st)): the table's least entry is round(min GELU / st); of the scales within 20% of the
    value that gives, the one that rebuilds the whole table best (all candidates in one tensor)."""
    lowest = -0.16997120747  # min over x of x * Phi(x)
    least = float(table.min())
    if least >= 0:
        raise ValueError("not a GELU table")
    s = (lowest / least) * (1 + torch.arange(-200, 201, dtype=torch.float64)[:, None] * 1e-3)  # (401, 1)
    x = torch.arange(-QMAX, QMAX + 1, dtype=torch.float64)[None] * s
    rebuilt = torch.round(0.5 * x * (1 + torch.special.erf(x / math.sqrt(2))) / s)
    return float(s[(rebuilt - table.double()[None]).abs().sum(1).argmin(), 0])


@torch.no_grad()
def float_state(cfg: PriorConfig, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The integer prior's tensors (as export gives them) read back as a float Prior's state dict: the
    same function up to the integer path's roundings (its LayerNorm gains and biases are folded into the
    next linear layer, so the float LayerNorms get gain 1 and bias 0). For training on from shipped
    weights (`bsqc train prior --init MODEL.safetensors`) and for the search's rate estimates
    (weights.Model.float_prior); never used to code.

    Units: the residual stream is int / 2^FRAC; q and k are rescaled so that the float attention's
    q.k / sqrt(hs) is the integer path's logit; v and the attention output stay in integer units; the MLP's
    hidden layer is real (its unit recovered from the GELU table); the heads give logits in nats.
    """
    validate(cfg, t)
    D, H = cfg.dim, cfg.heads
    hs = D // H
    res = 2.0**-FRAC
    f = lambda x: x.double()  # noqa: E731

    def affine(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) with y_int ~ x_int @ W^T + b, the layer's integer output without rounding."""
        scale = f(t[f"{name}.m"]) * 2.0 ** -int(t[f"{name}.s"])
        return f(t[f"{name}.w"]) * scale[:, None], f(t[f"{name}.b"])

    out = {k: f(t[k]) * res for k in ("tok_emb", "row_emb", "col_emb", "cond_emb")}
    out = {f"{k}.weight": v for k, v in out.items()}
    out["start"] = f(t["start"]) * res
    for i in range(cfg.layers):
        p = f"blocks.{i}."
        out[p + "ln1.weight"], out[p + "ln1.bias"] = torch.ones(D), torch.zeros(D)
        out[p + "ln2.weight"], out[p + "ln2.bias"] = torch.ones(D), torch.zeros(D)
        W, b = affine(p + "qkv")
        W, b = W * LN_SCALE, b.clone()  # the float LayerNorm's output is the integer one / LN_SCALE
        att = float(t[p + "att_m"]) * 2.0 ** -int(t[p + "att_s"])  # logit in nats = dot_int * att / EXP_STEP
        c = math.sqrt(att / EXP_STEP * math.sqrt(hs))  # q and k times c: q.k / sqrt(hs) is that logit
        W[: 2 * D] *= c
        b[: 2 * D] *= c
        out[p + "attn.qkv.weight"], out[p + "attn.qkv.bias"] = W, b
        W, b = affine(p + "proj")
        out[p + "attn.proj.weight"], out[p + "attn.proj.bias"] = W * res, b * res
        st = _gelu_scale(t[p + "gelu_table"])
        W, b = affine(p + "fc1")
        out[p + "fc1.weight"], out[p + "fc1.bias"] = W * LN_SCALE * st, b * st
        W, b = affine(p + "fc2")
        out[p + "fc2.weight"], out[p + "fc2.bias"] = W * res / st, b * res
    for j in range(cfg.groups):
        out[f"head_ln.{j}.weight"], out[f"head_ln.{j}.bias"] = torch.ones(D), torch.zeros(D)
        W, b = affine(f"heads.{j}")
        out[f"heads.{j}.weight"], out[f"heads.{j}.bias"] = W * LN_SCALE / EXP_STEP, b / EXP_STEP
    return {k: v.float().contiguous() for k, v in out.items()}
