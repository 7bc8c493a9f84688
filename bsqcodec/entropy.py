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
    """Decodes one stream symbol by symbol (or a few rows at a time)."""

    def __init__(self, data: bytes) -> None:
        if len(data) % 4:
            raise FormatError("stream length is not a multiple of 4 bytes")
        words = np.frombuffer(data, "<u4").astype(np.uint32)
        self._dec = constriction.stream.queue.RangeDecoder(words)
        self._family = _family()

    def decode(self, tables: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(self._dec.decode(self._family, _rows(tables)), dtype=np.int64)
        except (ValueError, RuntimeError, AssertionError) as e:  # constriction reports bad data this way
            raise FormatError(f"corrupt stream: {e}") from None

    def decode_row(self, table: np.ndarray) -> int:
        """One symbol under one table: a 1-D float64 array of positive integers (the hot path)."""
        try:
            return int(self._dec.decode(self._family, table[None])[0])
        except (ValueError, RuntimeError, AssertionError) as e:
            raise FormatError(f"corrupt stream: {e}") from None


def decode(data: bytes, tables: np.ndarray) -> np.ndarray:
    """All symbols of a stream whose tables are known up front (tests, conformance)."""
    return Decoder(data).decode(tables)


def bits(symbols: np.ndarray, tables: np.ndarray) -> float:
    """Sum of -log2 p(symbol) under the integer tables (the ideal code length)."""
    t = np.asarray(tables, dtype=np.float64)
    p = t[np.arange(len(t)), np.asarray(symbols).reshape(-1)]
    return float(-(np.log2(p) - np.log2(t.sum(1))).sum())
