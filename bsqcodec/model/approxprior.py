"""A float32 twin of the integer prior: the same network without its roundings, for estimates only.

The encoder's search (codec/search.py) weighs each token bit by the prior's cost of it, computed once
from the starting tokens. Those costs steer the search; they never reach the entropy coder, which
always codes with the integer-exact tables (intprior.py). So they may come from this cheaper pass:
the integer prior's own tensors read as real numbers (a linear layer's integer weights times its
multiplier, LayerNorm and the GELU and exp tables as the functions they tabulate, attention as a
softmax), in plain float32 products and torch's fused attention. Its tables differ from the exact ones
in the last few digits, so its costs differ by about a thousandth of a bit: the search flips the same
bits, or nearly. Its results depend on the machine, as any float computation does; files do not,
since the tokens the search picks are coded by the exact prior.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .intprior import EXP_STEP, LN_EPS, LN_SCALE, OUT_ONE, QMAX, RES_MAX, IntLinear, IntPrior


class _Linear:
    """An IntLinear as a float32 affine map on the same integer scales: y ~ x @ (w * scale) + b."""

    def __init__(self, lin: IntLinear) -> None:
        self.w = (lin.wt * lin.scale).float()  # (in, out)
        self.b = (lin.offset - 0.5).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b, x.reshape(-1, x.shape[-1]), self.w).view(*x.shape[:-1], -1)


def _layernorm(x: torch.Tensor) -> torch.Tensor:
    """int_layernorm without its roundings."""
    c = x - x.mean(-1, keepdim=True)
    var = (c * c).mean(-1, keepdim=True)
    return (c * (LN_SCALE / torch.sqrt(var + LN_EPS))).clamp_(-QMAX, QMAX)


class ApproxPrior:
    """Teacher-forced probability tables of an IntPrior, approximately, in float32."""

    def __init__(self, ip: IntPrior) -> None:
        self.cfg = ip.cfg
        self.n = ip.n
        f = lambda t: t.float()  # noqa: E731
        self.tok_emb, self.start = f(ip.tok_emb), f(ip.start)
        self.row_emb, self.col_emb, self.cond_emb = f(ip.row_emb), f(ip.col_emb), f(ip.cond_emb)
        self.layers = [
            {
                "qkv": _Linear(L["qkv"]), "proj": _Linear(L["proj"]), "fc1": _Linear(L["fc1"]), "fc2": _Linear(L["fc2"]),
                "gelu": f(L["gelu"]),
                # the exact path weighs key j by exp(-round(gap_j * att_scale) / EXP_STEP): a softmax of dot * scale
                "scale": float(L["att_scale"]) / EXP_STEP,
            }
            for L in ip.layers
        ]
        self.heads = [_Linear(h) for h in ip.heads]

    def _inputs(self, sym: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        B, T, G = sym.shape
        pos = self.row_emb[rows] + self.col_emb[cols]  # (T, D)
        offs = torch.arange(G) * self.n
        prev = self.tok_emb[sym[:, :-1] + offs].sum(-2) + pos[1:]
        start = (self.start + pos[:1]).expand(B, 1, -1)
        return torch.cat([start, prev], 1).clamp_(-RES_MAX, RES_MAX)

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H = self.cfg.heads
        hs = C // H
        for L in self.layers:
            qkv = L["qkv"](_layernorm(x)).clamp_(-QMAX, QMAX)
            q, k, v = (t.reshape(B, T, H, hs).transpose(1, 2) for t in qkv.split(C, dim=2))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=L["scale"])
            x = (x + L["proj"](o.transpose(1, 2).reshape(B, T, C))).clamp_(-RES_MAX, RES_MAX)
            h = L["fc1"](_layernorm(x)).clamp_(-QMAX, QMAX)
            g = L["gelu"].index_select(0, h.round_().add_(QMAX).long().view(-1)).view(h.shape)  # the GELU's own table
            x = (x + L["fc2"](g)).clamp_(-RES_MAX, RES_MAX)
        return x

    @torch.no_grad()
    def tables(self, sym: torch.Tensor, rows: int, cols: int) -> list[torch.Tensor]:
        """As IntPrior.tables: sym (B, T, G) -> list over groups of (B, T, n), here float32 probabilities that sum to 1."""
        B, T, G = sym.shape
        t = torch.arange(T)
        h = self._hidden(self._inputs(sym.cpu(), torch.div(t, cols, rounding_mode="floor"), t % cols))
        out = []
        for j in range(G):
            z = h
            for k in range(j):
                z = z + self.cond_emb[sym[..., k] + k * self.n]
            logits = self.heads[j](_layernorm(z))  # at scale 1 / EXP_STEP, as the exact path's
            # the exact table: OUT_ONE * exp(-gap / EXP_STEP) for the gap below the largest logit, at least 1
            e = torch.exp((logits - logits.amax(-1, keepdim=True)) / EXP_STEP).clamp_min_(1.0 / OUT_ONE)
            out.append(e / e.sum(-1, keepdim=True))
        return out


def of(ip: IntPrior) -> ApproxPrior:
    """The float twin of an IntPrior, made once and kept with it."""
    twin = getattr(ip, "_approx_twin", None)
    if twin is None:
        twin = ApproxPrior(ip)
        ip._approx_twin = twin
    return twin

