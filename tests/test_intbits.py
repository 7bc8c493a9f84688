"""The second stage's integer bit prior (intbits.py): the float prior's context, exported, exact on every path."""

import numpy as np
import pytest
import torch

from bsqcodec.model import intbits
from bsqcodec.model.intprior import OUT_ONE, PATHS
from bsqcodec.model.residual import BitPrior, kept_mask

L1, R, L = 5, 2, 6


def _grid(seed=0, h=4, w=5):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 2, (h, w, L1), generator=g)
    bits = torch.randint(0, 2, (h * R, w * R, L), generator=g).to(torch.uint8)
    budget = torch.tensor([0, 2, 4, 6])[torch.randint(0, 4, (h * R, w * R), generator=g)]
    return base, bits, budget


def _prior(budget=True, seed=0):
    torch.manual_seed(seed)
    prior = BitPrior(L1, R, L, width=32, budget=budget).eval()
    with torch.no_grad():
        for p in prior.parameters():
            p.mul_(3)  # logits of several nats, as a trained prior gives
    return prior


@pytest.mark.parametrize("budget", [True, False])
def test_the_context_is_what_the_float_prior_sees(budget):
    prior = _prior(budget)
    base, bits, bmap = _grid()
    ctx = intbits.context(base, bits, bmap, R, with_budget=budget)
    if budget:
        ctx = torch.cat([ctx[..., :-1], ctx[..., -1:] / L], -1)  # the float prior sees k / L
    want = prior.logits((base.float() * 2 - 1).permute(2, 0, 1)[None], bits.permute(2, 0, 1)[None].float(),
                        kept_mask(bmap[None], L))[0].permute(1, 2, 0)
    got = prior.net(ctx.float().permute(2, 0, 1)[None])[0].permute(1, 2, 0)
    assert torch.allclose(got, want, atol=1e-5)
    rows = intbits.context(base, bits, bmap, R, slice(3, 6), with_budget=budget)
    assert torch.equal(rows, intbits.context(base, bits, bmap, R, with_budget=budget)[3:6])
    at = torch.rand(rows.shape[:2], generator=torch.Generator().manual_seed(3)) < 0.4  # some tokens of the rows
    assert torch.equal(intbits.context(base, bits, bmap, R, slice(3, 6), with_budget=budget, at=at), rows[at])


def test_the_integer_prior_follows_the_float_one():
    prior = _prior()
    calib = torch.cat([intbits.context(*_grid(s), R).reshape(-1, 1 + L1 + R * R + 4 * L + 1) for s in range(32)])
    ip = intbits.IntBitPrior(intbits.export(prior, calib))
    base, bits, bmap = _grid(99)
    ctx = intbits.context(base, bits, bmap, R)
    with torch.no_grad():
        fl = prior.logits((base.float() * 2 - 1).permute(2, 0, 1)[None], bits.permute(2, 0, 1)[None].float(),
                          kept_mask(bmap[None], L))[0].permute(1, 2, 0).double()
    il = ip.logits(ctx) / 256
    assert float(fl.abs().max()) > 3 and float((il - fl).abs().max()) < 0.1  # nats
    kept = kept_mask(bmap[None], L)[0].permute(1, 2, 0).double()
    tab = ip.tables(ctx)
    ideal = float((torch.nn.functional.binary_cross_entropy_with_logits(fl, bits.double(), reduction="none") * kept).sum()) / np.log(2)
    assert abs(intbits.bits_cost(tab, bits, kept) / ideal - 1) < 0.01
    # the likelier value gets the table's top, the other at least 1
    assert (tab.amax(-1) == OUT_ONE).all() and (tab >= 1).all()
    assert torch.equal(tab[..., 1] == OUT_ONE, il >= 0) and torch.equal(tab[..., 0] == OUT_ONE, il <= 0)


@pytest.mark.parametrize("budget", [True, False])
def test_an_exported_prior_reads_back_as_floats_that_give_its_logits(budget):
    """float_state (how a run starts from a shipped model file) inverts export up to its rounding."""
    prior = _prior(budget)
    C = 1 + L1 + R * R + 4 * L + int(budget)
    calib = torch.cat([intbits.context(*_grid(s), R, with_budget=budget).reshape(-1, C) for s in range(32)])
    t = intbits.export(prior, calib)
    for i in (1, 2):  # the hidden scales come back from the GELU tables
        s = intbits.gelu_scale(t[f"bits.gelu{i}_table"])
        assert int((intbits.gelu_table(s) != t[f"bits.gelu{i}_table"]).sum()) <= 20  # of 4,095: ties of rounding
    back = BitPrior(L1, R, L, width=32, budget=budget).eval()
    back.load_state_dict(intbits.float_state(t, budget, L))
    base, bits, bmap = _grid(99)
    args = ((base.float() * 2 - 1).permute(2, 0, 1)[None], bits.permute(2, 0, 1)[None].float(), kept_mask(bmap[None], L))
    with torch.no_grad():
        want, got = prior.logits(*args), back.logits(*args)
    assert float(want.abs().max()) > 3 and float((got - want).abs().max()) < 0.1  # nats
    for k, v in prior.state_dict().items():
        assert not torch.equal(v, back.state_dict()[k])  # read back from integers, not copied


def test_tables_are_the_same_integers_on_every_product_path_and_any_split():
    prior = _prior()
    calib = intbits.context(*_grid(1), R).reshape(-1, 1 + L1 + R * R + 4 * L + 1)
    ip = intbits.IntBitPrior(intbits.export(prior, calib))
    ctx = intbits.context(*_grid(2, 6, 7), R)
    want = None
    for path in PATHS:
        try:
            for lin in ip.layers:
                lin.use(path)
        except ValueError:  # no exact int8 products in this torch
            continue
        got = ip.tables(ctx)
        assert want is None or torch.equal(got, want), path
        want = got
        assert torch.equal(torch.cat([ip.tables(ctx[:5]), ip.tables(ctx[5:])]), got)
        assert torch.equal(ip.tables(ctx.reshape(-1, ctx.shape[-1])).view_as(got), got)


def test_bad_tables_are_refused():
    prior = _prior()
    t = intbits.export(prior, intbits.context(*_grid(1), R).reshape(-1, 1 + L1 + R * R + 4 * L + 1))
    for name, bad in (("bits.out_exp_table", t["bits.out_exp_table"][:-1]), ("bits.gelu1_table", t["bits.gelu1_table"] * 4)):
        with pytest.raises(ValueError):
            intbits.IntBitPrior({**t, name: bad})


def test_no_contexts_give_no_tables():
    prior = _prior()
    ip = intbits.IntBitPrior(intbits.export(prior, intbits.context(*_grid(1), R).reshape(-1, 1 + L1 + R * R + 4 * L + 1)))
    assert ip.tables(torch.zeros(0, ip.context_size, dtype=torch.float64)).shape == (0, L, 2)


def test_the_quad_context_is_what_the_float_quad_prior_sees():
    torch.manual_seed(1)
    prior = BitPrior(L1, R, L, width=32, kind="quad3x3").eval()
    base, bits, bmap = _grid(3)
    ctx = intbits.context(base, bits, bmap, R, kind="quad3x3")
    ctx = torch.cat([ctx[..., :-1], ctx[..., -1:] / L], -1)
    with torch.no_grad():
        want = prior.logits((base.float() * 2 - 1).permute(2, 0, 1)[None], bits.permute(2, 0, 1)[None].float(),
                            kept_mask(bmap[None], L))[0].permute(1, 2, 0)
        got = prior.net(ctx.float().permute(2, 0, 1)[None])[0].permute(1, 2, 0)
    assert ctx.shape[-1] == BitPrior.context_size(L1, R, L, True, "quad3x3")
    assert torch.allclose(got, want, atol=1e-5)
    rows = intbits.context(base, bits, bmap, R, slice(2, 5), kind="quad3x3")
    assert torch.equal(rows, intbits.context(base, bits, bmap, R, kind="quad3x3")[2:5])
    at = torch.rand(rows.shape[:2], generator=torch.Generator().manual_seed(3)) < 0.4  # some tokens of the rows
    assert torch.equal(intbits.context(base, bits, bmap, R, slice(2, 5), kind="quad3x3", at=at), rows[at])
