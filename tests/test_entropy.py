import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bsqcodec.format import entropy
from bsqcodec.errors import FormatError


@st.composite
def problems(draw):
    n = draw(st.integers(2, 300))
    count = draw(st.integers(0, 200))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    skew = draw(st.sampled_from([1, 16, 2**16]))
    tables = rng.integers(1, skew + 1, size=(count, n)).astype(np.int64)
    symbols = rng.integers(0, n, size=count)
    return symbols, tables


class TestEntropy:
    @given(problems())
    def test_round_trip(self, prob):
        symbols, tables = prob
        data = entropy.encode(symbols, tables)
        assert len(data) % 4 == 0
        assert np.array_equal(entropy.decode(data, tables), symbols)

    @given(problems())
    def test_symbol_by_symbol(self, prob):
        symbols, tables = prob
        dec = entropy.Decoder(entropy.encode(symbols, tables))
        out = [int(dec.decode(tables[i : i + 1])[0]) for i in range(len(symbols))]
        assert out == list(symbols)

    @given(problems())
    def test_trimmed_round_trip_and_canonical_form(self, prob):
        symbols, tables = prob
        full = entropy.encode(symbols, tables)
        data = entropy.encode(symbols, tables, trimmed=True)
        assert len(data) <= len(full) and (not data or data[-1] != 0)  # a zero last byte would go
        assert np.array_equal(entropy.decode(data, tables, trimmed=True), symbols)
        dec = entropy.Decoder(data, trimmed=True)  # row by row, as the codec decodes
        assert [dec.decode_row(tables[i].astype(np.float64)) for i in range(len(symbols))] == list(symbols)
        dec.finish()
        with pytest.raises(FormatError):  # the same symbols, but not the shortest form
            entropy.decode(data + b"\0", tables, trimmed=True)
        if len(symbols):  # other bytes are refused, or are another stream (of other symbols)
            for other in (data + b"\x01", np.frombuffer(full, "<u4").astype(">u4").tobytes()):
                if other != data:
                    try:
                        assert not np.array_equal(entropy.decode(other, tables, trimmed=True), symbols)
                    except FormatError:
                        pass

    @given(problems(), st.integers(0, 2**32 - 1))
    def test_the_decoders_check_of_the_shortest_form_is_trims_answer(self, prob, seed):
        """is_trimmed (four trial decodes) accepts exactly what trim (a bisection) writes."""
        symbols, tables = prob[0], prob[1].astype(np.float64)
        words = np.frombuffer(entropy.encode(symbols, tables), "<u4")
        data = entropy.trim(words, symbols, tables)
        assert entropy.is_trimmed(data, words, symbols, tables)
        full = words.astype(">u4").tobytes()
        rng = np.random.default_rng(seed)
        others = {data + b"\0", data[:-1], full, full[: len(data) + 1], data + bytes([int(rng.integers(1, 256))])}
        if data:
            n = int.from_bytes(data, "big")
            others |= {(n + d).to_bytes(len(data), "big") for d in (-1, 1, 2) if 0 <= n + d < 256 ** len(data)}
        for other in others - {data}:
            assert not entropy.is_trimmed(other, words, symbols, tables)

    def test_trimming_saves_the_word_rounding(self):
        rng = np.random.default_rng(3)
        saved = []
        for _ in range(50):
            tables = rng.integers(1, 2**16, size=(300, 256))
            symbols = rng.integers(0, 256, 300)
            saved.append(len(entropy.encode(symbols, tables)) - len(entropy.encode(symbols, tables, trimmed=True)))
        assert min(saved) >= 0 and np.mean(saved) > 1.5  # about 2 bytes of a word's rounding, on average

    def test_a_tile_of_certain_first_symbols_trims_to_nothing(self):
        """The coder's words can end in zeros (here all of them): the stream may be much shorter than they are."""
        tables = np.tile(np.array([16, 1, 1, 1]), (2000, 1))  # about 0.25 bits a symbol, all words zero
        symbols = np.zeros(2000, dtype=np.int64)
        assert len(entropy.encode(symbols, tables)) >= 8 and entropy.encode(symbols, tables, trimmed=True) == b""
        dec = entropy.Decoder(b"", trimmed=True)
        for i in range(2000):
            assert dec.decode_row(tables[i].astype(np.float64)) == 0
            if i % 16 == 15:
                dec.check()
        dec.finish()

    def test_trimming_a_long_run_of_zero_words_takes_few_trial_decodes(self, monkeypatch):
        tables = np.ones((20000, 256))  # 8 bits a symbol, all symbols 0: 5,000 zero words
        symbols = np.zeros(20000, dtype=np.int64)
        calls = []
        real = entropy._decodes_to
        monkeypatch.setattr(entropy, "_decodes_to", lambda *a: calls.append(1) or real(*a))
        assert entropy.encode(symbols, tables, trimmed=True) == b""
        assert len(calls) <= 2 * 16

    def test_size_close_to_ideal(self):
        rng = np.random.default_rng(1)
        tables = rng.integers(1, 2**16, size=(5000, 256))
        tables[:, 7] = 2**22
        symbols = np.where(rng.random(5000) < 0.5, 7, rng.integers(0, 256, 5000))
        ideal = entropy.bits(symbols, tables)
        real = len(entropy.encode(symbols, tables)) * 8
        assert ideal <= real <= ideal * 1.01 + 64

    def test_pinned_bytes(self):
        tables = np.array([[1, 2, 3, 4], [4, 3, 2, 1], [1, 1, 1, 1]])
        assert entropy.encode(np.array([1, 3, 2]), tables).hex() == PINNED

    def test_invalid_tables(self):
        with pytest.raises(ValueError):
            entropy.encode(np.array([0]), np.array([[0, 1]]))
        with pytest.raises(ValueError):
            entropy.encode(np.array([2]), np.array([[1, 1]]))

    def test_invalid_stream_length(self):
        with pytest.raises(FormatError):
            entropy.Decoder(b"abc")


PINNED = "b6703d4a"  # constriction 0.5 range coder, Categorical(perfect=False)
