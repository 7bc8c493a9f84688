"""formats/bsq.md section 4 (the range coder), written from its text alone, with switches that each
follow one wrong reading of it: the conformance vectors must fail every switched decoder
(tests/test_spec_vectors.py).

Switches (a set of names in `wrong`):
- "exact_cum": cum(i) as the exact rational floor of S_i (2^24 - n) / Z instead of binary64;
- "carry_first_only": a carry resolves only the first pending word (f + 1), the rest stay 0xFFFFFFFF;
- "no_extra_word": a 1.x stream never ends with the extra word 0;
- "pending_as_words": pending words are emitted at once as they are (no carry ever reaches them);
- "drop_pending_at_end": the end forgets the words still pending;
- "empty_invalid": an empty (2.0) stream is taken for a truncated one;
- "no_wrap_shift": the encoder's shift lower << 32 keeps its high bits (no wrap modulo 2^64). (A decoder
  that leaves point << 32 unwrapped but wraps point ⊖ lower computes the same q: no file can tell.)
"""

from __future__ import annotations

import struct
from fractions import Fraction

M64 = 2**64 - 1


def cums(table, wrong=frozenset()) -> list[int]:
    """cum(0) ... cum(n) of a table of positive integers (the quantized model)."""
    n = len(table)
    Z = sum(table)
    scale = float(2**24 - n) / float(Z)
    out, s = [], 0
    for i, t in enumerate(table):
        if "exact_cum" in wrong:
            out.append(int(Fraction(s * (2**24 - n), Z)) + i)
        else:
            out.append(int(float(s) * scale) + i)  # int(): truncation towards zero
        s += t
    return out + [2**24]


class Stats:
    """What a stream's encoding went through: the blind spots a vector must cover."""

    def __init__(self) -> None:
        self.max_pending = 0  # most words pending at once
        self.pending_at_end = False
        self.extra_word = False  # the 1.x final word 0
        self.pending_now = 0  # words pending after the last symbol (before the end)
        self.carried_multi = False  # a carry into two or more pending words (f + 1, then words 0)


def words_of(symbols, tables, wrong=frozenset(), stats: Stats | None = None) -> list[int]:
    """The coder's 32-bit words for these symbols under these tables."""
    stats = stats or Stats()
    lower, rng, words, pending = 0, M64, [], None  # pending: [m, f]

    def flush(carry: bool) -> None:
        m, f = pending
        stats.carried_multi |= carry and m >= 2
        if carry:
            rest = [0xFFFFFFFF] * (m - 1) if "carry_first_only" in wrong else [0] * (m - 1)
            words.extend([f + 1] + rest)
        else:
            words.extend([f] + [0xFFFFFFFF] * (m - 1))

    for sym, table in zip(symbols, tables):
        c = cums(table, wrong)
        sc = rng >> 24
        rng = sc * (c[sym + 1] - c[sym])
        new = (lower + sc * c[sym]) & M64
        if pending and (new + rng) & M64 > new:
            flush(new < lower)
            pending = None
        lower = new
        if rng < 2**32:
            rng <<= 32
            w = (lower >> 32) & 0xFFFFFFFF
            lower = lower << 32 if "no_wrap_shift" in wrong else (lower << 32) & M64
            if pending:
                pending[0] += 1
                stats.max_pending = max(stats.max_pending, pending[0])
            elif (lower + rng) & M64 > lower or "pending_as_words" in wrong:
                words.append(w)
            else:
                pending = [1, w]
                stats.max_pending = max(stats.max_pending, 1)
    stats.pending_now = pending[0] if pending else 0
    if rng != M64:
        pt = (lower + 2**32 - 1) & M64
        if pending:
            stats.pending_at_end = True
            if "drop_pending_at_end" not in wrong:
                flush(not pt >= lower)
        words.append(pt >> 32)
        if ((lower + rng) & M64) >> 32 == pt >> 32:
            stats.extra_word = True
            if "no_extra_word" not in wrong:
                words.append(0)
    return words


def encode_v1(symbols, tables, wrong=frozenset(), stats=None) -> bytes:
    w = words_of(symbols, tables, wrong, stats)
    return struct.pack(f"<{len(w)}I", *w)


def decodes_to(words: list[int], symbols, tables, wrong=frozenset()) -> bool:
    """Whether these words decode to exactly these symbols under these tables (q >= 2^24: they do not)."""
    return _decode_words(words, tables, wrong) == list(symbols)


def _as_words(data: bytes) -> list[int]:
    data = data + bytes(-len(data) % 4)
    return list(struct.unpack(f">{len(data) // 4}I", data))


def encode_v2(symbols, tables, wrong=frozenset(), stats=None) -> bytes:
    """The trimmed (2.0) stream: the shortest of B[:m] and B[:m] + 1 that decodes to the symbols."""
    w = words_of(symbols, tables, wrong, stats)
    B = struct.pack(f">{len(w)}I", *w)
    best = B
    for m in range(len(B) - 1, -1, -1):
        cands = [B[:m]]
        up = int.from_bytes(B[:m], "big") + 1
        if m and up < 256**m:
            cands.append(up.to_bytes(m, "big"))
        found = next((c for c in cands if decodes_to(_as_words(c), symbols, tables, wrong)), None)
        if found is None:
            break
        best = found
    return best


def decode(data: bytes, tables, major: int, wrong=frozenset()) -> list[int] | None:
    """The symbols a stream decodes to under these tables (one per symbol), or None for an invalid one."""
    if major == 1:
        if len(data) % 4:
            return None
        return _decode_words(list(struct.unpack(f"<{len(data) // 4}I", data)), tables, wrong)
    return _decode_words(_as_words(data), tables, wrong)


def _decode_words(words: list[int], tables, wrong=frozenset()) -> list[int] | None:
    it = iter(words[2:])
    w = words[:2] + [0] * (2 - len(words[:2]))
    point, lower, rng, out = (w[0] << 32) | w[1], 0, M64, []
    for table in tables:
        c = cums(table, wrong)
        sc = rng >> 24
        q = ((point - lower) & M64) // sc
        if q >= 2**24:
            return None
        i = max(j for j in range(len(table)) if c[j] <= q)
        out.append(i)
        lower = (lower + sc * c[i]) & M64
        rng = sc * (c[i + 1] - c[i])
        if rng < 2**32:
            lower, rng = (lower << 32) & M64, rng << 32
            point = ((point << 32) & M64) | next(it, 0)
    return out


def stream_ok(data: bytes, symbols, tables, major: int, wrong=frozenset()) -> bool:
    """Whether a decoder following these rules accepts the stream as the encoding of these symbols:
    it decodes to them and is exactly what its encoder writes for them."""
    if not data and "empty_invalid" in wrong:
        return False
    if decode(data, tables, major, wrong) != list(symbols):
        return False
    enc = encode_v1 if major == 1 else encode_v2
    return enc(symbols, tables, wrong) == data
