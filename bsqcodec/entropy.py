"""The only user of constriction: (symbols, integer probability tables) <-> bytes.

Tables are arrays of positive integers, one row per symbol; constriction's Categorical with
perfect=False quantizes each row deterministically. Streams are little-endian uint32 words.
"""

from __future__ import annotations

import numpy as np

import constriction

from .errors import FormatError


def _family():
    return constriction.stream.model.Categorical(perfect=False)


def _rows(tables: np.ndarray) -> np.ndarray:
    t = np.ascontiguousarray(tables, dtype=np.float64)
    if t.ndim != 2 or t.shape[1] < 2 or not (t > 0).all():
        raise ValueError("tables must be (N, n) arrays of positive values with n >= 2")
    return t


def encode(symbols: np.ndarray, tables: np.ndarray) -> bytes:
    """Range-code symbols[i] under tables[i]; returns the stream's bytes."""
    symbols = np.ascontiguousarray(symbols, dtype=np.int32).reshape(-1)
    tables = _rows(tables)
    if len(symbols) != len(tables):
        raise ValueError("one table per symbol")
    if len(symbols) and (symbols.min() < 0 or symbols.max() >= tables.shape[1]):
        raise ValueError("symbol out of range")
    enc = constriction.stream.queue.RangeEncoder()
    if len(symbols):
        enc.encode(symbols, _family(), tables)
    return enc.get_compressed().astype("<u4").tobytes()


class Decoder:
    """Decodes one stream symbol by symbol (or a few rows at a time), and proves it is an encoder's.

    Every decoded symbol is also encoded again under the same table. A stream is valid only if
    that re-encoding gives back exactly its bytes (finish()); random or truncated data that still
    decodes to symbols fails there, and usually much earlier: as soon as the re-encoding is longer
    than the stream (check()).
    """

    def __init__(self, data: bytes) -> None:
        if len(data) % 4:
            raise FormatError("stream length is not a multiple of 4 bytes")
        self._words = np.frombuffer(data, "<u4").astype(np.uint32)
        self._dec = constriction.stream.queue.RangeDecoder(self._words)
        self._enc = constriction.stream.queue.RangeEncoder()
        self._family = _family()
        self._sym = np.zeros(1, dtype=np.int32)

    def decode(self, tables: np.ndarray) -> np.ndarray:
        tables = _rows(tables)
        try:
            out = np.asarray(self._dec.decode(self._family, tables), dtype=np.int32)
        except (ValueError, RuntimeError, AssertionError) as e:  # constriction reports bad data this way
            raise FormatError(f"corrupt stream: {e}") from None
        if len(out):
            self._enc.encode(out, self._family, tables)
        return out.astype(np.int64)

    def decode_row(self, table: np.ndarray) -> int:
        """One symbol under one table: a 1-D float64 array of positive integers (the hot path)."""
        t = table[None]
        try:
            self._sym[0] = self._dec.decode(self._family, t)[0]
        except (ValueError, RuntimeError, AssertionError) as e:
            raise FormatError(f"corrupt stream: {e}") from None
        self._enc.encode(self._sym, self._family, t)
        return int(self._sym[0])

    def check(self) -> None:
        """Raise FormatError if the symbols so far already need more words than the stream has."""
        if self._enc.num_words() > len(self._words):
            raise FormatError("the stream is not what an encoder writes (it ends too early)")

    def finish(self) -> None:
        """Raise FormatError unless the stream is exactly the encoding of the symbols decoded from it."""
        got = self._enc.get_compressed()
        if len(got) != len(self._words) or not np.array_equal(got.astype(np.uint32), self._words):
            raise FormatError("the stream is not what an encoder writes for the symbols it decodes to")


def decode(data: bytes, tables: np.ndarray) -> np.ndarray:
    """All symbols of a stream whose tables are known up front (tests, conformance); the stream is verified."""
    dec = Decoder(data)
    out = dec.decode(tables)
    dec.finish()
    return out


def bits(symbols: np.ndarray, tables: np.ndarray) -> float:
    """Sum of -log2 p(symbol) under the integer tables (the ideal code length)."""
    t = np.asarray(tables, dtype=np.float64)
    p = t[np.arange(len(t)), np.asarray(symbols).reshape(-1)]
    return float(-(np.log2(p) - np.log2(t.sum(1))).sum())
