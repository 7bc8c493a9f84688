"""The second stage's streams (stage2.py): budget map and kept bits <-> bytes, band by band, pass by pass."""

import numpy as np
import pytest
import torch

from bsqcodec.model import intbits
from bsqcodec.codec import stage2
from bsqcodec.format.container import BAND2
from bsqcodec.errors import FormatError
from bsqcodec.model.residual import BitPrior

L1, R, L = 5, 2, 6
CHOICES = (0, 2, 4, 6)


@pytest.fixture(scope="module", params=BitPrior.KINDS)
def prior(request):
    kind = request.param
    torch.manual_seed(0)
    fp = BitPrior(L1, R, L, width=16, kind=kind).eval()
    with torch.no_grad():
        for p in fp.parameters():
            p.mul_(3)
    g = torch.Generator().manual_seed(5)
    calib = intbits.context(torch.randint(0, 2, (4, 4, L1), generator=g), torch.randint(0, 2, (8, 8, L), generator=g),
                            torch.full((8, 8), 4), R, kind=kind)
    return intbits.IntBitPrior(intbits.export(fp, calib.reshape(-1, calib.shape[-1])), kind=kind)


def _case(seed, h, w):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 2**L1, (h, w))
    rc = rng.integers(0, len(CHOICES), (h, w))
    bits = torch.from_numpy(rng.integers(0, 2, (h * R, w * R, L)).astype(np.uint8))
    return tokens, rc, bits


def test_round_trip_across_bands(prior):
    tokens, rc, bits = _case(0, BAND2 // R + 3, 5)  # two bands of the second grid
    table = stage2.map_table(rc, len(CHOICES))
    streams = stage2.encode(prior, tokens, L1, bits, rc, CHOICES, R, table)
    assert len(streams) == 1 + prior.passes * 2
    got, budget = stage2.decode(prior, tokens, L1, streams, table, CHOICES, R, L)
    kept = torch.arange(L)[None, None, :] < budget[..., None]
    assert torch.equal(budget, stage2.budgets(rc, CHOICES, R))
    assert torch.equal(got, bits * kept) and (got[~kept] == 0).all()
    assert stage2.token_crc(got, budget) == stage2.token_crc(bits, budget)


def test_the_streams_cost_what_the_tables_say(prior):
    tokens, rc, bits = _case(1, 6, 7)
    table = stage2.map_table(rc, len(CHOICES))
    streams = stage2.encode(prior, tokens, L1, bits, rc, CHOICES, R, table)
    budget = stage2.budgets(rc, CHOICES, R)
    b1 = torch.from_numpy(((tokens[..., None] >> np.arange(L1 - 1, -1, -1)) & 1))
    tab = prior.tables(prior.context(b1, bits, budget, R))
    kept = (torch.arange(L)[None, None, :] < budget[..., None]).double()
    ideal = intbits.bits_cost(tab, bits, kept)
    assert abs(8 * sum(map(len, streams[1:])) - ideal) < 8 * 2 * 2 + 0.01 * ideal  # within a few bytes a stream


def test_a_changed_byte_a_wrong_table_or_a_missing_stream_is_refused(prior):
    tokens, rc, bits = _case(2, 6, 7)
    table = stage2.map_table(rc, len(CHOICES))
    streams = stage2.encode(prior, tokens, L1, bits, rc, CHOICES, R, table)
    for i in range(len(streams)):
        if not streams[i]:
            continue
        bad = list(streams)
        bad[i] = bytes([streams[i][0] ^ 0x40]) + streams[i][1:]
        try:
            got, budget = stage2.decode(prior, tokens, L1, bad, table, CHOICES, R, L)
        except FormatError:
            continue
        # a changed stream that still decodes must decode to other bits (the token CRC then fails)
        assert stage2.token_crc(got, budget) != stage2.token_crc(bits, stage2.budgets(rc, CHOICES, R))
    with pytest.raises(FormatError, match=f"in {prior.passes - 1} passes, its second-stage model in {prior.passes}"):
        stage2.decode(prior, tokens, L1, streams[:-1], table, CHOICES, R, L)
    with pytest.raises(FormatError, match="table"):
        stage2.decode(prior, tokens, L1, streams, table[:-1], CHOICES, R, L)
    with pytest.raises(FormatError, match="geometry"):
        stage2.decode(prior, tokens, L1 + 1, streams, table, CHOICES, R, L)


def test_the_token_crc_reads_kept_bits_only():
    bits = torch.ones(2, 2, 4, dtype=torch.uint8)
    budget = torch.tensor([[0, 2], [4, 1]])
    other = bits.clone()
    other[0, 0] = 0  # not kept: the same tokens
    assert stage2.token_crc(other, budget) == stage2.token_crc(bits, budget)
    other[1, 0, 3] = 0  # kept
    assert stage2.token_crc(other, budget) != stage2.token_crc(bits, budget)
    zeros = torch.zeros(2, 2, 4, dtype=torch.uint8)  # the same kept bits (none set) under another map
    assert stage2.token_crc(zeros, budget) != stage2.token_crc(zeros, torch.tensor([[0, 2], [4, 2]]))
