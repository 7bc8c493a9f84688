"""Structured mutations of .bsq files and model files that keep every checksum valid.

Used by the suite (tests/test_fuzz.py, with hypothesis) and by the fuzz campaign
(benchmarks/fuzz.py). A mutated file is reassembled from its parts with fresh CRCs, so the
decoder cannot reject it by a checksum: it has to understand what is wrong.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from bsqcodec.format.container import leb128

FIXED = struct.Struct("<4sBBHIIBBBBHHB")
FIELDS = ["magic", "major", "minor", "flags", "width", "height", "colour", "patch", "bits", "groups",
          "tile_rows", "tile_cols", "name_len"]
MAXIMA = [None, 255, 255, 65535, 2**32 - 1, 2**32 - 1, 255, 255, 255, 255, 65535, 65535, 255]


@dataclass
class Parts:
    fixed: list
    name: bytes
    model_hash: bytes
    lengths: list[int]
    chunks: list[tuple[bytes, bytes]]
    streams: list[bytes]
    tile_count: int | None = None  # None: len(lengths) (1.x only: 2.0 stores no count)
    extra: bytes = b""  # bytes after the payload CRC
    notes: list[str] = field(default_factory=list)

    @property
    def major(self) -> int:
        return self.fixed[1]


def _tiles(fixed: list) -> int:
    w, h, patch, trows, tcols = fixed[4], fixed[5], fixed[7], fixed[10], fixed[11]
    return -(-(-(-h // patch)) // trows) * -(-(-(-w // patch)) // tcols)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    n, shift = 0, 0
    while True:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, pos


def split(data: bytes) -> Parts:
    """A valid file -> its parts (no checks: the input is one bsqc wrote)."""
    fixed = list(FIXED.unpack_from(data, 0))
    pos = FIXED.size
    n = fixed[-1]
    name = data[pos : pos + n]
    pos += n
    v1 = fixed[1] == 1
    hash_len = 32 if v1 else 16
    mhash = data[pos : pos + hash_len]
    pos += hash_len
    if v1:
        (t,) = struct.unpack_from("<I", data, pos)
        pos += 4
        lengths = list(struct.unpack_from(f"<{t}I", data, pos))
        pos += 4 * t
        (k,) = struct.unpack_from("<H", data, pos)
        pos += 2
    else:
        lengths = []
        for _ in range(_tiles(fixed)):
            n, pos = _read_varint(data, pos)
            lengths.append(n)
        k = data[pos]
        pos += 1
    chunks = []
    for _ in range(k):
        ctype = data[pos : pos + 4]
        if v1:
            (clen,) = struct.unpack_from("<I", data, pos + 4)
            start = pos + 8
        else:
            clen, start = _read_varint(data, pos + 4)
        chunks.append((ctype, data[start : start + clen]))
        pos = start + clen
    pos += 4  # header CRC
    streams = []
    for ln in lengths:
        streams.append(data[pos : pos + ln])
        pos += ln
    return Parts(fixed, name, mhash, lengths, chunks, streams)


def assemble(p: Parts) -> bytes:
    """Parts -> bytes, with both CRCs computed over what is there."""
    head = bytearray(FIXED.pack(*p.fixed)) + p.name + p.model_hash
    if p.major == 1:
        head += struct.pack("<I", len(p.lengths) if p.tile_count is None else p.tile_count)
        head += struct.pack(f"<{len(p.lengths)}I", *p.lengths)
        head += struct.pack("<H", len(p.chunks))
        for t, d in p.chunks:
            head += t + struct.pack("<I", len(d)) + d
    else:
        head += b"".join(leb128(n) for n in p.lengths)  # also past the 4-byte limit
        head += bytes([len(p.chunks) % 256])
        for t, d in p.chunks:
            head += t + leb128(len(d)) + d
    head += struct.pack("<I", zlib.crc32(head))
    payload = b"".join(p.streams)
    return bytes(head) + payload + struct.pack("<I", zlib.crc32(payload)) + p.extra


def _rand_bytes(rng, n: int) -> bytes:
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def _value(rng, hi: int) -> int:
    """A boundary value or a random one up to hi."""
    picks = [0, 1, 2, hi, hi - 1, hi // 2, int(rng.integers(0, hi + 1))]
    return int(picks[int(rng.integers(0, len(picks)))])


KINDS = ["header", "name", "hash", "tile_count", "lengths", "chunks", "tcrc", "stream_random",
         "stream_flip", "stream_resize", "stream_swap", "stream_foreign", "trailing"]


def mutate(data: bytes, rng: np.random.Generator, kind: str | None = None, foreign: bytes | None = None) -> tuple[bytes, str]:
    """One structured mutation of a valid file; returns (new bytes, kind)."""
    p = split(data)
    kind = kind or KINDS[int(rng.integers(0, len(KINDS)))]
    if kind == "header":
        i = int(rng.integers(1, len(FIELDS)))
        p.fixed[i] = _value(rng, MAXIMA[i])
        if FIELDS[i] == "name_len":  # keep the parts in step with the claimed length sometimes
            p.name = (p.name * 40)[: p.fixed[i]] if rng.random() < 0.5 else p.name
    elif kind == "name":
        p.name = bytes(rng.choice(list(b"abcdefqz0189_.-A~ \x00\xff"), int(rng.integers(0, 40))).tolist())
        p.fixed[-1] = len(p.name) if rng.random() < 0.8 else _value(rng, 255)
    elif kind == "hash":
        p.model_hash = _rand_bytes(rng, len(p.model_hash))
    elif kind == "tile_count" and p.major == 1:
        p.tile_count = _value(rng, 2**32 - 1)
    elif kind == "tile_count":  # 2.0 stores no count: a table entry too many or too few
        if rng.random() < 0.5 or not p.lengths:
            p.lengths.append(_value(rng, 600))
        else:
            p.lengths.pop(int(rng.integers(0, len(p.lengths))))
    elif kind == "lengths" and p.lengths:
        i = int(rng.integers(0, len(p.lengths)))
        p.lengths[i] = _value(rng, 2**32 - 1) if rng.random() < 0.3 else max(0, p.lengths[i] + int(rng.integers(-8, 9)))
    elif kind == "chunks":
        r = rng.random()
        if r < 0.4:
            t = bytes(rng.choice(list(b"aAzZiItT"), 4).tolist()) if rng.random() < 0.5 else _rand_bytes(rng, 4)
            p.chunks.append((t, _rand_bytes(rng, int(rng.integers(0, 64)))))
        elif r < 0.7 and p.chunks:
            p.chunks.pop(int(rng.integers(0, len(p.chunks))))
        else:
            p.chunks = p.chunks * int(rng.integers(2, 80))  # duplicates, or more than 64 chunks
    elif kind == "tcrc":
        p.chunks = [(t, _rand_bytes(rng, len(d) if rng.random() < 0.7 else int(rng.integers(0, 9))) if t == b"tCRC" else d)
                    for t, d in p.chunks]
    elif kind.startswith("stream") and p.streams:
        i = int(rng.integers(0, len(p.streams)))
        s = bytearray(p.streams[i])
        if kind == "stream_random":
            s = bytearray(_rand_bytes(rng, len(s)))
        elif kind == "stream_flip" and s:
            j = int(rng.integers(0, len(s)))
            s[j] ^= 1 << int(rng.integers(0, 8))
        elif kind == "stream_resize":
            cut = int(rng.integers(-3, 4)) * 4 + (int(rng.integers(0, 4)) if rng.random() < 0.2 else 0)
            s = s[: max(0, len(s) + cut)] if cut < 0 else s + bytearray(_rand_bytes(rng, cut))
        elif kind == "stream_swap" and len(p.streams) > 1:
            j = int(rng.integers(0, len(p.streams)))
            p.streams[i], p.streams[j] = p.streams[j], p.streams[i]
            s = bytearray(p.streams[i])
        elif kind == "stream_foreign" and foreign is not None:
            fs = split(foreign).streams
            s = bytearray(fs[int(rng.integers(0, len(fs)))])
        p.streams[i] = bytes(s)
        p.lengths[i] = len(s)
    elif kind == "trailing":
        p.extra = _rand_bytes(rng, int(rng.integers(1, 9)))
    return assemble(p), kind


MODEL_KINDS = ["config", "tensor_value", "tensor_shape", "tensor_dtype", "tensor_drop", "tensor_extra", "metadata"]


def mutate_model(config: dict, tensors: dict, rng: np.random.Generator, kind: str | None = None):
    """One mutation of a model's (config dict, tensors dict) -> (config, tensors, metadata extra, kind)."""
    import copy

    import torch

    kind = kind or MODEL_KINDS[int(rng.integers(0, len(MODEL_KINDS)))]
    config = copy.deepcopy(config)
    tensors = dict(tensors)
    names = sorted(tensors)
    name = names[int(rng.integers(0, len(names)))]
    meta: dict[str, str] = {}
    if kind == "config":
        part = ["tokenizer", "prior"][int(rng.integers(0, 2))]
        key = sorted(config[part])[int(rng.integers(0, len(config[part])))]
        config[part][key] = [0, -1, 10**9, 3, "x", None, 1.5, True][int(rng.integers(0, 8))]
    elif kind == "tensor_value":
        t = tensors[name].clone()
        if t.numel():
            flat = t.view(-1)
            j = int(rng.integers(0, flat.numel()))
            if t.is_floating_point():
                flat[j] = [float("nan"), float("inf"), -1e30, 0.0][int(rng.integers(0, 4))]
            else:
                info = torch.iinfo(t.dtype)
                flat[j] = int([info.min, info.max, 0, -1, min(info.max, 2**22)][int(rng.integers(0, 5))])
        tensors[name] = t
    elif kind == "tensor_shape":
        t = tensors[name]
        tensors[name] = t.reshape(-1)[: max(0, t.numel() - 1)].clone() if t.numel() else torch.zeros(3, dtype=t.dtype)
    elif kind == "tensor_dtype":
        t = tensors[name]
        tensors[name] = t.to(torch.float32 if not t.is_floating_point() else torch.int64)
    elif kind == "tensor_drop":
        del tensors[name]
    elif kind == "tensor_extra":
        tensors["prior.extra" if rng.random() < 0.5 else "tokenizer.extra"] = torch.zeros(2, dtype=torch.int64)
    else:
        meta = {"intprior": ["2", "", "1.0"][int(rng.integers(0, 3))]}
    return config, tensors, meta, kind


OUTCOMES = ["rejected", "accepted_same", "accepted_header_variant", "accepted_altered_stream", "crash"]


def classify(original: bytes, original_tokens, mutated: bytes, decode) -> tuple[str, str]:
    """(outcome, detail) of decoding a mutated file with decode(data) -> (header, tokens, pixels).

    accepted_same: it decodes to the original's tokens (a harmless change, such as an ancillary
    chunk removed or two identical streams swapped); accepted_header_variant: the streams are the
    original's and a header change still describes a valid file (another preset name, a width that
    keeps the token grid); accepted_altered_stream: altered streams decoded to other tokens without
    an error (must never happen); crash: anything but a BsqError.
    """
    import torch

    from bsqcodec.errors import BsqError

    try:
        _, tokens, _ = decode(mutated)
    except BsqError as e:
        return "rejected", str(e).split(":")[0][:60]
    except Exception as e:  # noqa: BLE001 - this is what the campaign looks for
        return "crash", f"{type(e).__name__}: {e}"[:200]
    if tokens.shape == original_tokens.shape and torch.equal(tokens, original_tokens):
        return "accepted_same", ""
    if b"".join(split(mutated).streams) == b"".join(split(original).streams):
        return "accepted_header_variant", ""
    return "accepted_altered_stream", ""
