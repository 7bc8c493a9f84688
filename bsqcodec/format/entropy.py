"""The only user of constriction: (symbols, integer probability tables) <-> bytes.

Tables are arrays of positive integers, one row per symbol; constriction's Categorical with
perfect=False quantizes each row deterministically. The coder writes uint32 words. A stream of format
1.x is those words, little-endian. A *trimmed* stream (format 2.0) is the words big-endian, so that the
bytes read as one binary fraction, cut to the shortest byte string (then the smallest) that, padded
with zero bytes, still decodes to the same symbols: it saves the coder's word rounding, about 1.8 bytes
a stream.
"""

from __future__ import annotations

import numpy as np

import constriction

from ..errors import FormatError


def _family():
    return constriction.stream.model.Categorical(perfect=False)


def _rows(tables: np.ndarray) -> np.ndarray:
    t = np.ascontiguousarray(tables, dtype=np.float64)
    if t.ndim != 2 or t.shape[1] < 2 or not (t > 0).all():
        raise ValueError("tables must be (N, n) arrays of positive values with n >= 2")
    return t


def encode(symbols: np.ndarray, tables: np.ndarray, trimmed: bool = False) -> bytes:
    """Range-code symbols[i] under tables[i]; returns the stream's bytes (trimmed: as format 2.0 stores it)."""
    symbols = np.ascontiguousarray(symbols, dtype=np.int32).reshape(-1)
    tables = _rows(tables)
    if len(symbols) != len(tables):
        raise ValueError("one table per symbol")
    if len(symbols) and (symbols.min() < 0 or symbols.max() >= tables.shape[1]):
        raise ValueError("symbol out of range")
    enc = constriction.stream.queue.RangeEncoder()
    if len(symbols):
        enc.encode(symbols, _family(), tables)
    words = enc.get_compressed()
    return trim(words, symbols, tables) if trimmed else words.astype("<u4").tobytes()


def _decodes_to(data: bytes, symbols: np.ndarray, tables: np.ndarray) -> bool:
    """Whether trimmed bytes, padded with zero bytes, decode to exactly these symbols."""
    words = np.frombuffer(data + bytes(-len(data) % 4), ">u4").astype(np.uint32)
    try:
        out = constriction.stream.queue.RangeDecoder(words).decode(_family(), tables)
    except (ValueError, RuntimeError, AssertionError):
        return False
    return np.array_equal(out, symbols)


def trim(words: np.ndarray, symbols: np.ndarray, tables: np.ndarray) -> bytes:
    """The trimmed stream of the coder's words for these symbols and tables (formats/bsq.md, section 4).

    With B the words as big-endian bytes, the stream is, for the smallest m that has one, the first of
    B[:m] and B[:m] + 1 (as an m-byte number) that decodes to the symbols. Any value that decodes to them
    lies in one interval that holds B, so these two are the smallest m-byte values that can; and if an
    m has one, so has m + 1, so m is found by bisection (a tile of zero words, which a crafted file can
    ask for, costs a few dozen trial decodes, not one per byte).
    """
    data = np.asarray(words, dtype=np.uint32).astype(">u4").tobytes()
    symbols = np.asarray(symbols, dtype=np.int32).reshape(-1)

    lo, hi, best = 0, len(data), data  # fit(len(data)) is the words themselves
    while lo < hi:
        mid = (lo + hi) // 2
        found = _fit(data, mid, symbols, tables)
        if found is None:
            lo = mid + 1
        else:
            hi, best = mid, found
    return best


def _fit(data: bytes, m: int, symbols: np.ndarray, tables: np.ndarray) -> bytes | None:
    """The first of data[:m] and data[:m] + 1 (as an m-byte number) that decodes to the symbols, or None."""
    shorter = [data[:m]]
    up = int.from_bytes(data[:m], "big") + 1
    if m and up < 256**m:
        shorter.append(up.to_bytes(m, "big"))
    return next((c for c in shorter if _decodes_to(c, symbols, tables)), None)


def is_trimmed(stream: bytes, words: np.ndarray, symbols: np.ndarray, tables: np.ndarray) -> bool:
    """Whether stream == trim(words, symbols, tables), in at most four trial decodes.

    The m-byte candidates that work are those of the smallest m and every longer one (trim's
    argument), so the stream is trim's result exactly when it is the candidate of its own length and
    the length one byte shorter has none: no bisection needed.
    """
    data = np.asarray(words, dtype=np.uint32).astype(">u4").tobytes()
    symbols = np.asarray(symbols, dtype=np.int32).reshape(-1)
    m = len(stream)
    if m > len(data) or _fit(data, m, symbols, tables) != stream:
        return False
    return m == 0 or _fit(data, m - 1, symbols, tables) is None


class Decoder:
    """Decodes one stream symbol by symbol (or a few rows at a time), and proves it is an encoder's.

    Every decoded symbol is also encoded again under the same table. A stream is valid only if
    that re-encoding gives back exactly its bytes (finish()); random or truncated data that still
    decodes to symbols fails there, and a 1.x stream usually much earlier: its symbols are re-encoded
    as they are decoded, and it fails as soon as the re-encoding is longer than the stream (check()).
    A trimmed stream's symbols are re-encoded at the end, in one call.
    """

    def __init__(self, data: bytes, trimmed: bool = False) -> None:
        self._data, self._trimmed = data, trimmed
        if trimmed:  # the words the decoder reads: zero bytes pad the last one
            self._words = np.frombuffer(data + bytes(-len(data) % 4), ">u4").astype(np.uint32)
            self._rows: list[np.ndarray] = []  # every table, to check that the stream is the shortest
            self._syms: list[np.ndarray] = []
        else:
            if len(data) % 4:
                raise FormatError("stream length is not a multiple of 4 bytes")
            self._words = np.frombuffer(data, "<u4").astype(np.uint32)
        self._dec = constriction.stream.queue.RangeDecoder(self._words)
        self._enc = None if trimmed else constriction.stream.queue.RangeEncoder()  # trimmed: finish() makes one
        self._family = _family()
        self._sym = np.zeros(1, dtype=np.int32)

    def decode(self, tables: np.ndarray) -> np.ndarray:
        tables = _rows(tables)
        try:
            out = np.asarray(self._dec.decode(self._family, tables), dtype=np.int32)
        except (ValueError, RuntimeError, AssertionError) as e:  # constriction reports bad data this way
            raise FormatError(f"corrupt stream: {e}") from None
        if len(out):
            if self._trimmed:
                self._rows.append(tables)
                self._syms.append(out.copy())
            else:
                self._enc.encode(out, self._family, tables)
        return out.astype(np.int64)

    def decode_row(self, table: np.ndarray) -> int:
        """One symbol under one table: a 1-D float64 array of positive integers (the hot path)."""
        t = table[None]
        try:
            self._sym[0] = self._dec.decode(self._family, t)[0]
        except (ValueError, RuntimeError, AssertionError) as e:
            raise FormatError(f"corrupt stream: {e}") from None
        if self._trimmed:  # re-encoded all at once in finish()
            self._rows.append(t.copy())
            self._syms.append(self._sym.copy())
        else:  # as it goes, so that check() sees the length
            self._enc.encode(self._sym, self._family, t)
        return int(self._sym[0])

    def check(self) -> None:
        """Raise FormatError if the symbols so far already need more words than the stream has."""
        # not for a trimmed stream: where the coder's words end in zeros, its stream may be far shorter
        # (a flat tile whose symbols are all the first of their tables codes to an empty stream)
        if not self._trimmed and self._enc.num_words() > len(self._words):
            raise FormatError("the stream is not what an encoder writes (it ends too early)")

    def finish(self) -> None:
        """Raise FormatError unless the stream is exactly the encoding of the symbols decoded from it."""
        if self._trimmed:
            if not self._syms:
                ok = not self._data
            else:
                rows, syms = np.concatenate(self._rows), np.concatenate(self._syms)
                enc = constriction.stream.queue.RangeEncoder()
                enc.encode(syms, self._family, rows)  # one call: the same words as one symbol at a time
                ok = is_trimmed(self._data, enc.get_compressed(), syms, rows)
        else:
            got = self._enc.get_compressed()
            ok = len(got) == len(self._words) and np.array_equal(got.astype(np.uint32), self._words)
        if not ok:
            raise FormatError("the stream is not what an encoder writes for the symbols it decodes to")


def decode(data: bytes, tables: np.ndarray, trimmed: bool = False) -> np.ndarray:
    """All symbols of a stream whose tables are known up front (tests, conformance); the stream is verified."""
    dec = Decoder(data, trimmed)
    out = dec.decode(tables)
    dec.finish()
    return out


def bits(symbols: np.ndarray, tables: np.ndarray) -> float:
    """Sum of -log2 p(symbol) under the integer tables (the ideal code length)."""
    t = np.asarray(tables, dtype=np.float64)
    p = t[np.arange(len(t)), np.asarray(symbols).reshape(-1)]
    return float(-(np.log2(p) - np.log2(t.sum(1))).sum())
