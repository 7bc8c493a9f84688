"""Integer-exact inference of the prior, and its export from the float model.

Every value that reaches the entropy coder is computed with integer arithmetic, or with float64
operations on integers that are exact (matrix products whose sums stay far below 2^53) or
correctly rounded by IEEE 754 (+, -, *, /, sqrt, conversion). Non-linearities (exp, GELU) are
lookup tables stored in the model file. So one teacher-forced pass, a token-by-token pass with the
KV cache, any batch of tiles, any thread count and any device give bit-identical probability tables.

Fixed-point conventions (int64 tensors unless noted):
- residual stream: real = int / 2^FRAC, clamped to +-RES_MAX
- LayerNorm output: real = int / LN_SCALE, clamped to +-QMAX (gain and bias are folded into the next linear)
- linear: acc = x @ W^T (W int8 per output channel), y = floor((acc * M + 2^(s-1)) / 2^s) + b
- attention: exp table indexed by the logit gap times EXP_STEP; weights sum exactly, rounded division
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import PriorConfig

FRAC = 12
RES_MAX = 2**24
LN_SCALE = 256
QMAX = 2047
EXP_STEP = 256  # exp table entries per unit of logit
EXP_LEN = 16 * EXP_STEP  # beyond a gap of 16 nats the weight is 0 (or the floor of 1 for output tables)
EXP_ONE = 2**16
LN_EPS = round(1e-5 * 4**FRAC)
CLAMP_GAP = 2**30


def _fdiv(a: torch.Tensor, b: int | torch.Tensor) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


def _rshift_round(v: torch.Tensor, s: torch.Tensor | int) -> torch.Tensor:
    """round(v / 2^s) for int64 v, ties up, by exact floor division (no bit shifts)."""
    p = 2**s if isinstance(s, int) else torch.pow(2, s)
    return _fdiv(v + _fdiv(p, 2), p)


def exp_table() -> torch.Tensor:
    t = [round(EXP_ONE * math.exp(-i / EXP_STEP)) for i in range(EXP_LEN)] + [0]
    return torch.tensor(t, dtype=torch.int64)


def gelu_table(scale: float) -> torch.Tensor:
    """GELU on the integer grid [-QMAX, QMAX] at `scale`, output on the same grid."""
    out = []
    for i in range(-QMAX, QMAX + 1):
        x = i * scale
        out.append(round(0.5 * x * (1 + math.erf(x / math.sqrt(2))) / scale))
    return torch.tensor(out, dtype=torch.int64)


def _multiplier(m: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Real multipliers m (>0) -> integers M and a shift s with M / 2^s ~ m and M < 2^31."""
    top = float(m.max())
    s = max(0, min(48, 30 - math.ceil(math.log2(max(top, 1e-30)))))
    return torch.round(m.double() * 2.0**s).long(), s


# ----------------------------------------------------------------------------------------------
# integer layers


def int_layernorm(x: torch.Tensor) -> torch.Tensor:
    """Residual ints (..., D) -> normalized ints at LN_SCALE, clamped to +-QMAX."""
    D = x.shape[-1]
    c = x - _fdiv(x.sum(-1, keepdim=True), D)
    var = (c * c).sum(-1, keepdim=True).double() / D
    den = torch.sqrt(var + float(LN_EPS))
    n = torch.round(c.double() * float(LN_SCALE) / den)
    return n.clamp(-QMAX, QMAX).long()


class IntLinear:
    def __init__(self, t: dict, name: str, device) -> None:
        self.w = t[f"{name}.w"].to(device=device, dtype=torch.float64)  # int8 values
        self.m = t[f"{name}.m"].to(device)
        self.s = int(t[f"{name}.s"].item())
        self.b = t[f"{name}.b"].to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.matmul(x.double(), self.w.t()).long()  # exact: |sum| < 2^31
        return _rshift_round(acc * self.m, self.s) + self.b


class KVCache:
    """Preallocated keys and values of every layer: (layers, B, heads, T, head size), float64 ints."""

    def __init__(self, layers: int, B: int, heads: int, T: int, hs: int, device) -> None:
        self.k = torch.zeros(layers, B, heads, T, hs, dtype=torch.float64, device=device)
        self.v = torch.zeros(layers, B, heads, T, hs, dtype=torch.float64, device=device)

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        self.k[layer, :, :, pos : pos + T] = k
        self.v[layer, :, :, pos : pos + T] = v
        return self.k[layer, :, :, : pos + T], self.v[layer, :, :, : pos + T]


class IntPrior:
    """The prior's integer-exact inference path; built from exported integer tensors."""

    def __init__(self, cfg: PriorConfig, t: dict[str, torch.Tensor], device="cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        dev = self.device
        self.n = 2**cfg.group_bits
        self.tok_emb = t["tok_emb"].to(dev)
        self.start = t["start"].to(dev)
        self.row_emb = t["row_emb"].to(dev)
        self.col_emb = t["col_emb"].to(dev)
        self.cond_emb = t["cond_emb"].to(dev)
        self.exp = t["exp_table"].to(dev)
        self.layers = []
        for i in range(cfg.layers):
            p = f"blocks.{i}."
            self.layers.append(
                {
                    "qkv": IntLinear(t, p + "qkv", dev),
                    "proj": IntLinear(t, p + "proj", dev),
                    "fc1": IntLinear(t, p + "fc1", dev),
                    "fc2": IntLinear(t, p + "fc2", dev),
                    "gelu": t[p + "gelu_table"].to(dev),
                    "att_m": int(t[p + "att_m"].item()),
                    "att_s": int(t[p + "att_s"].item()),
                }
            )
        self.heads = [IntLinear(t, f"heads.{j}", dev) for j in range(cfg.groups)]

    # -- embeddings --------------------------------------------------------------------------
    def embed(self, prev_sym: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Inputs of positions whose previous token has symbols prev_sym (B, T, G); None = start."""
        pos = self.row_emb[rows] + self.col_emb[cols]  # (B, T, D) or (T, D)
        if prev_sym is None:
            return self.start + pos
        offs = torch.arange(self.cfg.groups, device=self.device) * self.n
        return self.tok_emb[prev_sym + offs].sum(-2) + pos

    def inputs_for(self, sym: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Teacher-forced inputs for all positions: sym (B, T, G) -> (B, T, D)."""
        B, T, _ = sym.shape
        start = self.embed(None, rows[:1], cols[:1]).expand(B, 1, -1)
        rest = self.embed(sym[:, :-1], rows[1:], cols[1:])
        return torch.cat([start, rest], 1)

    # -- transformer ---------------------------------------------------------------------------
    def hidden(self, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        """Residual ints x (B, T, D) of positions pos..pos+T-1 -> outputs (B, T, D); fills the cache."""
        B, T, C = x.shape
        H = self.cfg.heads
        hs = C // H
        for li, L in enumerate(self.layers):
            qkv = L["qkv"](int_layernorm(x)).clamp(-QMAX, QMAX)
            q, k, v = qkv.double().split(C, dim=2)
            q = q.view(B, T, H, hs).transpose(1, 2)  # (B, nh, T, hs)
            k = k.view(B, T, H, hs).transpose(1, 2)
            v = v.view(B, T, H, hs).transpose(1, 2)
            K, V = cache.update(li, pos, k, v)  # (B, nh, pos+T, hs)
            dots = torch.einsum("bhqd,bhkd->bhqk", q, K)  # exact integers, (B, nh, T, pos+T)
            if T > 1:
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=self.device).tril(pos)
                dots = dots.masked_fill(~mask, -float(CLAMP_GAP))
            gap = (dots.amax(-1, keepdim=True) - dots).clamp(max=float(CLAMP_GAP)).long()
            idx = _rshift_round(gap * L["att_m"], L["att_s"]).clamp(max=EXP_LEN)
            w = self.exp[idx]  # (B, nh, T, pos+T)
            wsum = w.sum(-1, keepdim=True)
            pv = torch.matmul(w.double(), V).long()  # exact: < 2^40
            o = _fdiv(2 * pv + wsum, 2 * wsum)  # rounded weighted mean, at v's scale
            o = o.transpose(1, 2).reshape(B, T, C)
            x = (x + L["proj"](o)).clamp(-RES_MAX, RES_MAX)
            h = L["fc1"](int_layernorm(x)).clamp(-QMAX, QMAX)
            g = L["gelu"][h + QMAX]
            x = (x + L["fc2"](g)).clamp(-RES_MAX, RES_MAX)
        return x

    def group_table(self, h: torch.Tensor, j: int, earlier: torch.Tensor | None) -> torch.Tensor:
        """Integer probability table (..., 2^g) of group j given h (..., D) and earlier groups (..., j)."""
        z = h
        for k in range(j):
            z = z + self.cond_emb[earlier[..., k] + k * self.n]
        logits = self.heads[j](int_layernorm(z))  # logits at scale 1/EXP_STEP
        gap = (logits.amax(-1, keepdim=True) - logits).clamp(max=EXP_LEN)
        return self.exp[gap].clamp(min=1)

    # -- whole tiles ------------------------------------------------------------------------
    def new_cache(self, B: int, T: int) -> KVCache:
        C = self.cfg.dim
        return KVCache(self.cfg.layers, B, self.cfg.heads, T, C // self.cfg.heads, self.device)

    def tables(self, sym: torch.Tensor, rows: int, cols: int) -> list[torch.Tensor]:
        """Teacher-forced tables for B tiles of one shape: sym (B, T, G) -> list over groups of (B, T, n)."""
        B, T, G = sym.shape
        t = torch.arange(T, device=self.device)
        rr, cc = _fdiv(t, cols), t % cols
        x = self.inputs_for(sym.to(self.device), rr, cc)
        h = self.hidden(x, self.new_cache(B, T), 0)
        return [self.group_table(h, j, sym[..., :j].to(self.device) if j else None) for j in range(G)]


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
    out["exp_table"] = exp_table()
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
        M, s = _multiplier(torch.tensor([st["q"] * st["k"] / math.sqrt(hs) * EXP_STEP]))
        out[p + "att_m"] = M[0].clone()
        out[p + "att_s"] = torch.tensor(s, dtype=torch.int64)
    n = 2**cfg.group_bits
    for j in range(cfg.groups):
        W, b = _fold_ln(prior.head_ln[j], prior.heads[j])
        _quant_linear(out, f"heads.{j}", W, b, 1 / LN_SCALE, torch.full((n,), 1 / EXP_STEP, dtype=torch.float64))
    return out


def table_bits(tables: list[torch.Tensor], sym: torch.Tensor) -> float:
    """Sum of -log2 p over symbols sym (..., G) under integer tables (list of (..., n))."""
    tot = 0.0
    for j, t in enumerate(tables):
        p = t.gather(-1, sym[..., j : j + 1].to(t.device)).double()
        tot -= (torch.log2(p) - torch.log2(t.sum(-1, keepdim=True).double())).sum().item()
    return tot
