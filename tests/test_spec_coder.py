"""formats/bsq.md section 4, implemented from its text alone, must agree with the coder bsqcodec uses."""

import struct

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from bsqcodec import entropy

M64 = 2**64 - 1


def cums(table) -> list[int]:
    """cum(0) ... cum(n) of a table of positive integers (the quantized model)."""
    n = len(table)
    scale = float(2**24 - n) / float(sum(table))
    out, s = [], 0
    for i, t in enumerate(table):
        out.append(int(float(s) * scale) + i)  # int(): truncation towards zero
        s += t
    return out + [2**24]


def spec_encode(symbols, tables) -> bytes:
    lower, rng, words, pending = 0, M64, [], None  # pending: [m, f]
    for sym, table in zip(symbols, tables):
        c = cums(table)
        sc = rng >> 24
        rng = sc * (c[sym + 1] - c[sym])
        new = (lower + sc * c[sym]) & M64
        if pending and (new + rng) & M64 > new:
            m, f = pending
            words += [f + 1] + [0] * (m - 1) if new < lower else [f] + [0xFFFFFFFF] * (m - 1)
            pending = None
        lower = new
        if rng < 2**32:
            rng <<= 32
            w = lower >> 32
            lower = (lower << 32) & M64
            if pending:
                pending[0] += 1
            elif (lower + rng) & M64 > lower:
                words.append(w)
            else:
                pending = [1, w]
    if rng != M64:
        pt = (lower + 2**32 - 1) & M64
        if pending:
            m, f = pending
            words += [f] + [0xFFFFFFFF] * (m - 1) if pt >= lower else [f + 1] + [0] * (m - 1)
        words.append(pt >> 32)
        if ((lower + rng) & M64) >> 32 == pt >> 32:
            words.append(0)
    return struct.pack(f"<{len(words)}I", *words)


def spec_decode(data: bytes, tables) -> list[int]:
    words = list(struct.unpack(f"<{len(data) // 4}I", data))
    it = iter(words[2:])
    w = words[:2] + [0] * (2 - len(words[:2]))
    point, lower, rng, out = (w[0] << 32) | w[1], 0, M64, []
    for table in tables:
        c = cums(table)
        sc = rng >> 24
        q = ((point - lower) & M64) // sc
        assert q < 2**24, "invalid stream"
        i = max(j for j in range(len(table)) if c[j] <= q)
        out.append(i)
        lower = (lower + sc * c[i]) & M64
        rng = sc * (c[i + 1] - c[i])
        if rng < 2**32:
            lower, rng = (lower << 32) & M64, rng << 32
            point = ((point << 32) & M64) | next(it, 0)
    return out


tables_st = st.integers(2, 64).flatmap(
    lambda n: st.lists(st.lists(st.integers(1, 2**20), min_size=n, max_size=n), min_size=0, max_size=60))


@given(tables_st, st.data())
def test_spec_coder_matches_bsqcodec(tables, data):
    symbols = [data.draw(st.integers(0, len(t) - 1)) for t in tables]
    arr = np.array(tables, dtype=np.float64).reshape(len(tables), -1) if tables else np.zeros((0, 2))
    ours = entropy.encode(np.array(symbols, dtype=np.int64), arr) if tables else b""
    assert spec_encode(symbols, tables) == ours
    assert spec_decode(ours, tables) == symbols


def test_spec_coder_on_skewed_tables():
    """Tables as the prior makes them: one symbol near 2^20, the rest at the floor of 1."""
    rng = np.random.default_rng(0)
    tables = []
    for _ in range(400):
        t = np.ones(256, dtype=np.int64)
        t[rng.integers(0, 256)] = 2**20
        tables.append(t.tolist())
    symbols = [int(np.argmax(t)) if rng.random() < 0.9 else int(rng.integers(0, 256)) for t in tables]
    ours = entropy.encode(np.array(symbols), np.array(tables, dtype=np.float64))
    assert spec_encode(symbols, tables) == ours
    assert spec_decode(ours, tables) == symbols
