"""One position of the integer prior at a time, for B tiles together: the decoder's and sampler's step.

A step is a few hundred operations on arrays of a few thousand values, so it costs what the library
charges per operation, not arithmetic. NumPy charges a fraction of what torch does, so on the CPU the
step runs in NumPy (NumpyStep), with torch only for the int8 matrix products that NumPy lacks (where
those are the fastest path: intprior.product_path); on other devices it runs IntPrior's torch
operations (TorchStep). Both compute exactly IntPrior's integers (tests compare every table): the same IEEE 754 element-wise operations on the same values,
and matrix products that are exact in any summation order (see intprior's module docstring).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from .intprior import ATT_LEN, LN_EPS, LN_SCALE, MAX_KEYS, QMAX, RES_MAX, IntLinear, IntPrior, OUT_LEN, one_f32_product


def stepper(ip: IntPrior, B: int, T: int) -> "NumpyStep | TorchStep":
    """The fastest exact step for this prior's device: B tiles of at most T positions."""
    return NumpyStep(ip, B, T) if ip.device.type == "cpu" else TorchStep(ip, B, T)


class TorchStep:
    """IntPrior's own operations, with its KV cache."""

    def __init__(self, ip: IntPrior, B: int, T: int) -> None:
        self.ip, self.cache = ip, ip.new_cache(B, T)

    def embed(self, prev: np.ndarray | None, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        """Inputs (B, 1, D) of positions (rows, cols) after tokens of symbols prev (B, G); None = start."""
        dev = self.ip.device
        r, c = torch.from_numpy(rows)[:, None].to(dev), torch.from_numpy(cols)[:, None].to(dev)
        if prev is None:
            return self.ip.embed(None, r, c).expand(len(rows), 1, -1)
        return self.ip.embed(torch.from_numpy(prev)[:, None].to(dev), r, c)

    def hidden(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        return self.ip.hidden(x, self.cache, pos)[:, 0]

    def table(self, h: torch.Tensor, j: int, earlier: np.ndarray) -> np.ndarray:
        """Group j's tables (B, 2^g) as float64 integers, given the earlier groups' symbols (B, j)."""
        e = torch.from_numpy(earlier).to(self.ip.device) if j else None
        return self.ip.group_table(h, j, e).cpu().numpy().astype(np.float64)


class _Linear:
    """IntLinear on NumPy float64 integers (n, in) -> (n, out), by the layer's path of products.

    On the float32 path, a batch whose products are all small enough takes one float32 product of x
    itself instead of two of its base-64 digits, as IntLinear does (intprior.one_f32_product).
    """

    def __init__(self, lin: IntLinear) -> None:
        self.path = lin.path
        self.w8 = lin.w8  # torch int8 (in, out) on the int8 path
        self.w32 = lin.w32.numpy() if lin.w32 is not None else None  # float32 (in, out) on the float32 path
        self.w64 = lin.wt.numpy()
        self.scale = lin.scale.numpy()
        self.offset = lin.offset.numpy()
        self.w_max, self.col_l1 = lin.w_max, lin.col_l1

    def one_product(self, x: np.ndarray) -> bool:
        """Whether x's float32 product with the weights is exact (intprior.one_f32_product)."""
        ax = np.abs(x)
        return one_f32_product(float(ax.sum(-1).max(initial=0.0)), float(ax.max(initial=0.0)), self.w_max, self.col_l1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.path == "float64":
            return np.floor(x @ self.w64 * self.scale + self.offset)
        if self.path == "float32" and self.one_product(x):
            acc = (x.astype(np.float32) @ self.w32).astype(np.float64)
            return np.floor(acc * self.scale + self.offset)
        n = len(x)
        if self.path == "int8":
            xi = x.astype(np.int16)
            digits = np.concatenate([xi >> 6, xi & 63]).astype(np.int8)  # as IntLinear: x = 64 hi + lo
            r = torch._int_mm(torch.from_numpy(digits), self.w8).numpy()
        else:
            hi = np.floor(x / 64)  # exact: a division by a power of two
            r = np.concatenate([hi, x - 64 * hi]).astype(np.float32) @ self.w32
        acc = r[n:].astype(np.float64) + r[:n] * 64.0  # exact (IntLinear's bound)
        return np.floor(acc * self.scale + self.offset)  # acc * scale is exact: one rounding, as addcmul's


def _clamp(x: np.ndarray, m: float) -> np.ndarray:
    """x clamped to [-m, m] in place (a fresh array): two ufuncs cost less than np.clip's wrapper."""
    return np.minimum(np.maximum(x, -m, out=x), m, out=x)


def _layernorm(x: np.ndarray) -> np.ndarray:
    """intprior.int_layernorm on (B, D) float64 integers, operation for operation."""
    D = x.shape[-1]
    c = x - np.floor(x.sum(-1, keepdims=True) / D)  # an exact integer quotient's floor (|sum| < 2^30)
    var = np.einsum("bi,bi->b", c, c)[:, None] / D  # an exact sum in any order
    n = np.round(c * float(LN_SCALE) / np.sqrt(var + LN_EPS))  # half to even, as torch.round
    return _clamp(n, QMAX)


def _attend(q: np.ndarray, kt: np.ndarray, v: np.ndarray, att_w: np.ndarray, att_scale: float) -> np.ndarray:
    """IntPrior._attend_one's integers for one query: q (B, nh, 1, hs), keys kt (B, nh, hs, keys),
    values v (B, nh, keys, hs + 1) whose last column is 1; float64 integers -> (B, nh, 1, hs).

    The same values as IntPrior's digit products, in one float64 product each: |q.k| <= QMAX^2 * 128
    and the weighted sums <= ATT_ONE * QMAX * MAX_KEYS, both far below 2^53, so they are exact in any
    order; gap, index and mean are IntPrior's element-wise operations on the same values.
    """
    dots = np.matmul(q, kt)  # (B, nh, 1, keys)
    gap = dots.max(-1, keepdims=True) - dots
    idx = np.minimum(gap * att_scale + 0.5, ATT_LEN).astype(np.int64)  # positive: truncation is the floor
    r = np.matmul(att_w[idx], v)  # (B, nh, 1, hs + 1)
    pv, wsum = r[..., :-1], r[..., -1:]
    return np.floor((wsum + 2 * pv) / (wsum * 2))


class _Params:
    """A prior's tensors as NumPy arrays, built once per IntPrior."""

    def __init__(self, ip: IntPrior) -> None:
        if ip.device.type != "cpu":
            raise ValueError("NumpyStep runs priors on the CPU")
        self.tok_emb, self.start = ip.tok_emb.numpy(), ip.start.numpy()
        self.row_emb, self.col_emb, self.cond_emb = ip.row_emb.numpy(), ip.col_emb.numpy(), ip.cond_emb.numpy()
        self.offs = np.arange(ip.cfg.groups) * ip.n
        self.out_exp = ip.out_exp.numpy()
        self.att_w = ip.att_w.numpy()  # the attention weights (ATT_LEN + 1,), float64 integers
        self.layers = [(_Linear(L["qkv"]), _Linear(L["proj"]), _Linear(L["fc1"]), _Linear(L["fc2"]),
                        L["gelu"].numpy(), L["att_scale"]) for L in ip.layers]
        self.heads = [_Linear(h) for h in ip.heads]


_PARAMS: "weakref.WeakKeyDictionary[IntPrior, _Params]" = weakref.WeakKeyDictionary()


class NumpyStep:
    """IntPrior's step in NumPy on the CPU, with a KV cache of its own (float64 integers)."""

    def __init__(self, ip: IntPrior, B: int, T: int) -> None:
        self.ip = ip
        self.p = _PARAMS.get(ip) or _PARAMS.setdefault(ip, _Params(ip))
        L, H = ip.cfg.layers, ip.cfg.heads
        hs = ip.cfg.dim // H
        if T > MAX_KEYS:
            raise ValueError(f"at most {MAX_KEYS} tokens per tile")
        # float64 integers; keys transposed, so that each step's dot products read them in order;
        # values with a column of ones, so that the weighted sum's product also sums the weights
        self.kt = np.zeros((L, B, H, hs, T))
        self.v = np.ones((L, B, H, T, hs + 1))

    def embed(self, prev: np.ndarray | None, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Inputs (B, D) of positions (rows, cols) after tokens of symbols prev (B, G); None = start."""
        p = self.p
        pos = p.row_emb[rows] + p.col_emb[cols]
        x = p.start + pos if prev is None else p.tok_emb[prev + p.offs].sum(-2) + pos
        return _clamp(x, RES_MAX)

    def hidden(self, x: np.ndarray, pos: int) -> np.ndarray:
        """Residual integers (B, D) at position pos -> outputs (B, D); fills the cache at pos."""
        B, C = x.shape
        H = self.ip.cfg.heads
        hs = C // H
        for li, (qkv_l, proj, fc1, fc2, gelu, att_scale) in enumerate(self.p.layers):
            qkv = _clamp(qkv_l(_layernorm(x)), QMAX)
            q = qkv[:, :C].reshape(B, H, 1, hs)
            self.kt[li, :, :, :, pos] = qkv[:, C : 2 * C].reshape(B, H, hs)
            self.v[li, :, :, pos, :-1] = qkv[:, 2 * C :].reshape(B, H, hs)
            o = _attend(q, self.kt[li, ..., : pos + 1], self.v[li, :, :, : pos + 1], self.p.att_w, att_scale)
            x = _clamp(x + proj(o.reshape(B, C)), RES_MAX)
            h = _clamp(fc1(_layernorm(x)), QMAX)
            g = gelu[(h + QMAX).astype(np.int64)]  # integers: the conversion is exact
            x = _clamp(x + fc2(g), RES_MAX)
        return x

    def table(self, h: np.ndarray, j: int, earlier: np.ndarray) -> np.ndarray:
        """Group j's tables (B, 2^g) as float64 integers, given the earlier groups' symbols (B, j)."""
        p = self.p
        z = h
        for k in range(j):
            z = z + p.cond_emb[earlier[:, k] + k * self.ip.n]
        logits = p.heads[j](_layernorm(z))  # logits at scale 1/EXP_STEP
        gap = np.minimum(logits.max(-1, keepdims=True) - logits, OUT_LEN)
        return np.maximum(p.out_exp[gap.astype(np.int64)], 1).astype(np.float64)

