"""formats/bsq.md section 4, implemented from its text alone, must agree with the coder bsqcodec uses."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from bsqcodec.format import entropy

import spec_ref


def spec_encode(symbols, tables) -> bytes:
    return spec_ref.encode_v1(symbols, tables)


def spec_decode(data: bytes, tables) -> list[int]:
    out = spec_ref.decode(data, tables, 1)
    assert out is not None, "invalid stream"
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


@given(tables_st, st.data())
def test_spec_trimmed_streams_match_bsqcodec(tables, data):
    """Section 4, trimmed streams: the shortest of B[:m] and B[:m] + 1 that decodes (q >= 2^24: it does not)."""
    symbols = [data.draw(st.integers(0, len(t) - 1)) for t in tables]
    arr = np.array(tables, dtype=np.float64).reshape(len(tables), -1) if tables else np.zeros((0, 2))
    ours = entropy.encode(np.array(symbols, dtype=np.int64), arr, trimmed=True) if tables else b""
    assert spec_ref.encode_v2(symbols, tables) == ours
    assert spec_ref.decode(ours, tables, 2) == symbols


def test_a_1x_stream_of_a_length_not_a_multiple_of_4_is_invalid():
    import pytest

    from bsqcodec.errors import FormatError

    assert spec_ref.decode(b"\x00" * 6, [[1, 1]], 1) is None
    with pytest.raises(FormatError, match="not a multiple of 4"):
        entropy.Decoder(b"\x00" * 6)
    entropy.Decoder(b"\x00" * 6, trimmed=True)  # a 2.0 stream may have any length
