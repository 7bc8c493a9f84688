"""formats/intprior.md, implemented from its text alone in plain Python integers, gives bsqcodec's tables."""

import math
from fractions import Fraction

import torch

from bsqcodec.model import weights
from bsqcodec.model.intprior import IntPrior

from conftest import TINY

RES_MAX, QMAX, LN_EPS, ATT_LEN, OUT_LEN, GAP_MAX = 2**20, 2047, 10, 3072, 6144, 2**30


def clamp(x, a, b):
    return min(max(x, a), b)


def floor_rat(p: Fraction) -> int:
    return math.floor(p)


def layernorm(x: list[int]) -> list[int]:
    D = len(x)
    mean = sum(x) // D  # floor division: towards minus infinity
    c = [v - mean for v in x]
    var = sum(v * v for v in c) / D  # one IEEE division of exact integers
    den = math.sqrt(var + LN_EPS)
    return [clamp(round(256 * v / den), -QMAX, QMAX) for v in c]  # round(): ties to even


def linear(t, name, x: list[int]) -> list[int]:
    W, m, s, b = (t[f"{name}.{k}"] for k in "wmsb")
    W, m, s, b = W.tolist(), m.tolist(), int(s), b.tolist()
    out = []
    for o in range(len(W)):
        acc = sum(wi * xi for wi, xi in zip(W[o], x))
        out.append(floor_rat(Fraction(acc * m[o], 2**s) + Fraction(1, 2)) + b[o])
    return out


def spec_tables(cfg, t, syms: list[list[int]], rows: int, cols: int) -> list[list[list[int]]]:
    """Tables[t][k] of one tile whose symbols are syms[t][k]."""
    D, H, G, n = cfg.dim, cfg.heads, cfg.groups, 2**cfg.group_bits
    hs = D // H
    L = lambda k: t[k].tolist()  # noqa: E731
    tok, start, row, col, cond = L("tok_emb"), L("start"), L("row_emb"), L("col_emb"), L("cond_emb")
    att_tab, out_tab = L("att_exp_table"), L("out_exp_table")
    keys = [[] for _ in range(cfg.layers)]
    vals = [[] for _ in range(cfg.layers)]
    tables = []
    for p in range(rows * cols):
        e = start if p == 0 else [sum(tok[syms[p - 1][k] + k * n][d] for k in range(G)) for d in range(D)]
        x = [clamp(e[d] + row[p // cols][d] + col[p % cols][d], -RES_MAX, RES_MAX) for d in range(D)]
        for i in range(cfg.layers):
            pre = f"blocks.{i}."
            u = [clamp(v, -QMAX, QMAX) for v in linear(t, pre + "qkv", layernorm(x))]
            q, k, v = u[:D], u[D:2 * D], u[2 * D:]
            keys[i].append(k)
            vals[i].append(v)
            o = []
            for h in range(H):
                sl = slice(h * hs, (h + 1) * hs)
                dots = [sum(a * b for a, b in zip(q[sl], kk[sl])) for kk in keys[i]]
                top = max(dots)
                M, s = int(t[pre + "att_m"]), int(t[pre + "att_s"])
                w = [att_tab[min(floor_rat(Fraction(min(top - dt, GAP_MAX) * M, 2**s) + Fraction(1, 2)), ATT_LEN)]
                     for dt in dots]
                W = sum(w)
                for d in range(sl.start, sl.stop):
                    P = sum(wi * vv[d] for wi, vv in zip(w, vals[i]))
                    o.append((2 * P + W) // (2 * W))  # roundhalfup(P / W)
            x = [clamp(a + b, -RES_MAX, RES_MAX) for a, b in zip(x, linear(t, pre + "proj", o))]
            z = [clamp(v, -QMAX, QMAX) for v in linear(t, pre + "fc1", layernorm(x))]
            gelu = L(pre + "gelu_table")
            y = [gelu[v + QMAX] for v in z]
            x = [clamp(a + b, -RES_MAX, RES_MAX) for a, b in zip(x, linear(t, pre + "fc2", y))]
        per_group = []
        for k in range(G):
            z = [x[d] + sum(cond[syms[p][kk] + kk * n][d] for kk in range(k)) for d in range(D)]
            logit = linear(t, f"heads.{k}", layernorm(z))
            top = max(logit)
            per_group.append([max(out_tab[min(top - lg, OUT_LEN)], 1) for lg in logit])
        tables.append(per_group)
    return tables


def test_spec_tables_equal_bsqcodec_tables():
    model = weights.random_model(TINY, seed=7)
    cfg = model.config.prior
    t = {k[len("prior."):]: v for k, v in model.tensors.items() if k.startswith("prior.")}
    ip = IntPrior(cfg, t)
    g = torch.Generator().manual_seed(1)
    for rows, cols in ((4, 5), (2, 3)):  # a whole tile and an edge tile
        sym = torch.randint(0, 2**cfg.group_bits, (1, rows * cols, cfg.groups), generator=g)
        ours = torch.stack(ip.tables(sym, rows, cols), 2)[0]  # (T, G, n)
        spec = spec_tables(cfg, t, sym[0].tolist(), rows, cols)
        assert ours.tolist() == spec


def test_roundhalfup_of_either_sign_is_the_floor_of_2p_plus_q_over_2q():
    """intprior.md section 1: halves towards +inf for any sign of p (-2.5 -> -2), as bsqcodec computes it."""
    import itertools

    t = weights.random_model(TINY, seed=3).tensors
    ip = IntPrior(TINY.prior, {k[len("prior."):]: v for k, v in t.items() if k.startswith("prior.")})
    for p, q in itertools.product(range(-50, 51), (1, 2, 3, 4, 10, 4095, 4096)):
        # the rounding of both attention paths (float64 products, and the digits' recombined) on r = (p, q)
        got = int(ip._rounded_mean(torch.tensor([[float(p), float(q)]], dtype=torch.float64))[0, 0])
        r = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [float(p), float(q)]]], dtype=torch.float64)  # digits 256 r0 + 16 r1 + r2
        assert int(ip._weighted_mean(r)[0, 0, 0]) == got
        assert got == (2 * p + q) // (2 * q) == math.floor(Fraction(p, q) + Fraction(1, 2))
    assert (2 * -5 + 2) // (2 * 2) == -2  # -2.5 -> -2: not half away from zero (-3), not truncation of (2p+q)/2q
