"""The .bsq container, version 1.0: header, tile table, optional chunks, streams, CRC-32s.

Standard library only. `formats/bsq.md` is the normative description; this module follows it
field by field. All integers are little-endian.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field

from .errors import ChecksumError, FormatError, LimitError, VersionError

MAGIC = b"BSQC"
MAJOR = 1
MINOR = 2  # the newest minor version this module reads and writes
TOKEN_CRC = b"tCRC"  # 1.2: CRC-32 of the decoded tokens (section 5 of formats/bsq.md)
MAX_BITS_V1_0 = 32  # 1.1 widened token bits to 48
MAX_DIM = 16384  # width and height are 1..MAX_DIM
DEFAULT_MAX_PIXELS = 89_478_485  # the pixel budget of encode and decode unless raised (Pillow's own default)


def check_pixels(width: int, height: int, max_pixels: int | None, what: str = "the image") -> None:
    """LimitError if width x height is over the pixel budget (None: DEFAULT_MAX_PIXELS)."""
    budget = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    if width * height > budget:
        raise LimitError(f"{what} is {width}x{height} = {width * height} pixels, over the budget of {budget} "
                         "(raise it with --max-pixels)")
MAX_NAME = 32
MAX_CHUNKS = 64
MAX_CHUNK_BYTES = 1 << 24
MAX_TILES = 1 << 22
COLOUR_SRGB8 = 0

_FIXED = struct.Struct("<4sBBHIIBBBBHHB")  # magic .. name length; 25 bytes
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def lowest_minor(bits: int, token_crc: bool = False) -> int:
    """The lowest minor version that can hold tokens of `bits` bits, and a tCRC chunk (writers use it)."""
    if token_crc:
        return 2
    return 1 if bits > MAX_BITS_V1_0 else 0


def token_crc(tokens) -> bytes:
    """The tCRC chunk's content: CRC-32 of the token grid in raster order, each token a little-endian u64."""
    import numpy as np

    grid = np.ascontiguousarray(np.asarray(tokens, dtype="<u8"))
    return struct.pack("<I", zlib.crc32(grid.tobytes()))


@dataclass
class Header:
    width: int
    height: int
    patch: int
    bits: int
    groups: int
    tile_rows: int
    tile_cols: int
    preset: str
    model_hash: bytes  # 32 bytes, SHA-256 of the model's canonical weights
    colour: int = COLOUR_SRGB8
    minor: int = 0
    chunks: list[tuple[bytes, bytes]] = field(default_factory=list)  # (4-byte type, data)

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (rows, cols)."""
        return -(-self.height // self.patch), -(-self.width // self.patch)

    @property
    def tile_grid(self) -> tuple[int, int]:
        r, c = self.grid
        return -(-r // self.tile_rows), -(-c // self.tile_cols)

    @property
    def tiles(self) -> int:
        a, b = self.tile_grid
        return a * b

    def chunk(self, ctype: bytes) -> bytes | None:
        for t, d in self.chunks:
            if t == ctype:
                return d
        return None

    def validate(self) -> None:
        if not (1 <= self.width <= MAX_DIM and 1 <= self.height <= MAX_DIM):
            raise LimitError(f"image dimensions {self.width}x{self.height} are outside 1..{MAX_DIM}")
        if self.colour != COLOUR_SRGB8:
            raise FormatError(f"unknown colour type {self.colour}")
        if not (1 <= self.patch <= 64):
            raise FormatError(f"bad patch size {self.patch}")
        if not (1 <= self.bits <= 48) or self.groups < 1 or self.bits % self.groups or self.bits // self.groups > 12:
            raise FormatError(f"bad token geometry: {self.bits} bits in {self.groups} groups")
        if self.bits > MAX_BITS_V1_0 and self.minor < 1:
            raise FormatError(f"{self.bits}-bit tokens need format version 1.1")
        if not (1 <= self.tile_rows <= 1024 and 1 <= self.tile_cols <= 1024):
            raise FormatError(f"bad tile shape {self.tile_rows}x{self.tile_cols}")
        if not (1 <= len(self.preset) <= MAX_NAME) or not _NAME_RE.match(self.preset):
            raise FormatError("bad preset name")
        if len(self.model_hash) != 32:
            raise FormatError("model hash must be 32 bytes")
        if self.tiles > MAX_TILES:
            raise LimitError("too many tiles")
        if len(self.chunks) > MAX_CHUNKS:
            raise FormatError("too many chunks")
        for t, d in self.chunks:
            if len(t) != 4 or not t.isalpha() or not t.isascii():
                raise FormatError(f"bad chunk type {t!r}")
            if len(d) > MAX_CHUNK_BYTES:
                raise LimitError("chunk too large")
        crcs = [d for t, d in self.chunks if t == TOKEN_CRC]
        if len(crcs) > 1 or any(len(d) != 4 for d in crcs):
            raise FormatError("bad tCRC chunk (one chunk of 4 bytes)")


def pack(header: Header, streams: list[bytes]) -> bytes:
    """Header and per-tile streams -> the bytes of a .bsq file."""
    header.validate()
    if len(streams) != header.tiles:
        raise ValueError(f"{header.tiles} tiles but {len(streams)} streams")
    name = header.preset.encode("ascii")
    out = bytearray(
        _FIXED.pack(MAGIC, MAJOR, header.minor, 0, header.width, header.height, header.colour,
                    header.patch, header.bits, header.groups, header.tile_rows, header.tile_cols, len(name))
    )
    out += name
    out += header.model_hash
    out += struct.pack("<I", len(streams))
    out += b"".join(struct.pack("<I", len(s)) for s in streams)
    out += struct.pack("<H", len(header.chunks))
    for t, d in header.chunks:
        out += t + struct.pack("<I", len(d)) + d
    out += struct.pack("<I", zlib.crc32(out))
    payload = b"".join(streams)
    return bytes(out) + payload + struct.pack("<I", zlib.crc32(payload))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise FormatError(f"file is truncated (in {what})")
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b


def unpack(data: bytes) -> tuple[Header, list[bytes]]:
    """Bytes of a .bsq file -> (header, streams). Raises a FormatError subclass on any defect."""
    data = bytes(data)
    if len(data) < 4 or data[:4] != MAGIC:
        raise FormatError("not a .bsq file (bad magic number)")
    r = _Reader(data)
    fixed = _FIXED.unpack(r.take(_FIXED.size, "header"))
    _, major, minor, flags, width, height, colour, patch, bits, groups, trows, tcols, nlen = fixed
    if major != MAJOR:
        raise VersionError(f"unsupported .bsq version {major}.{minor} (this decoder reads {MAJOR}.x)")
    if nlen > MAX_NAME:
        raise FormatError("bad preset name length")
    name = r.take(nlen, "header")
    mhash = r.take(32, "header")
    (ntiles,) = struct.unpack("<I", r.take(4, "header"))
    if ntiles > MAX_TILES:
        raise FormatError("bad tile count")
    lengths = struct.unpack(f"<{ntiles}I", r.take(4 * ntiles, "tile table"))
    (nchunks,) = struct.unpack("<H", r.take(2, "header"))
    if nchunks > MAX_CHUNKS:
        raise FormatError("too many chunks")
    chunks = []
    for _ in range(nchunks):
        ctype = r.take(4, "chunk")
        (clen,) = struct.unpack("<I", r.take(4, "chunk"))
        if clen > MAX_CHUNK_BYTES:
            raise FormatError("chunk too large")
        chunks.append((ctype, r.take(clen, "chunk")))
    body_end = r.pos
    (hcrc,) = struct.unpack("<I", r.take(4, "header checksum"))
    if zlib.crc32(data[:body_end]) != hcrc:
        raise ChecksumError("header checksum mismatch (the file is corrupt)")
    if flags != 0:
        raise FormatError("reserved flags are set")
    try:
        preset = name.decode("ascii")
    except UnicodeDecodeError:
        raise FormatError("bad preset name") from None
    header = Header(width, height, patch, bits, groups, trows, tcols, preset, mhash, colour, minor, chunks)
    header.validate()
    for t, _ in chunks:
        if t[:1].isupper():
            raise FormatError(f"unknown critical chunk {t.decode('ascii')!r}")
    if ntiles != header.tiles:
        raise FormatError(f"tile table has {ntiles} entries, the geometry needs {header.tiles}")
    total = sum(lengths)
    payload = r.take(total, "payload")
    (pcrc,) = struct.unpack("<I", r.take(4, "payload checksum"))
    if r.pos != len(data):
        raise FormatError("trailing bytes after the payload checksum")
    if zlib.crc32(payload) != pcrc:
        raise ChecksumError("payload checksum mismatch (the file is corrupt)")
    streams, pos = [], 0
    for n in lengths:
        streams.append(payload[pos : pos + n])
        pos += n
    return header, streams


def header_size(data: bytes) -> int:
    """Bytes before the payload (header, tile table, chunks, header CRC) of a valid file."""
    h, streams = unpack(data)
    return len(data) - sum(len(s) for s in streams) - 4
