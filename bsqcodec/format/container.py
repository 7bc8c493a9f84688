"""The .bsq container, versions 1.x and 2.x: header, tile table, optional chunks, streams, CRC-32s.

Version 2.0 (written since bsqcodec 0.4) keeps 1.x's layout and makes its header smaller: a 16-byte model
hash, no tile count (the geometry gives it), stream and chunk lengths as LEB128 varints and a one-byte
chunk count (its streams are also trimmed to the byte: entropy.py). Version 2.1 adds a second token
stage: a critical `Rstg` chunk describes it and its streams follow the first stage's payload CRC, with a
CRC of their own; without them the file is the first stage's 2.0 file. Files of every 1.x version are
still read.

Standard library only. `formats/bsq.md` is the normative description; this module follows it
field by field. All integers are little-endian.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field

from ..config import SecondConfig
from ..errors import ChecksumError, FormatError, LimitError, VersionError

MAGIC = b"BSQC"
MAJOR = 2  # the version writers use
MINORS = {1: 2, 2: 1}  # the newest minor of each major this module reads and writes
HASH_BYTES = {1: 32, 2: 16}  # the model hash in the header: SHA-256, whole (1.x) or its first 16 bytes
TOKEN_CRC = b"tCRC"  # 1.2: CRC-32 of the decoded tokens (section 5 of formats/bsq.md)
SECOND = b"Rstg"  # 2.1: the second token stage (section 11 of formats/bsq.md)
BAND2 = 64  # rows of second-stage tokens per band of its streams
PASSES2 = tuple(sorted(set(SecondConfig.CONTEXTS.values())))  # passes of a band: the checker context's 2, quad3x3's 4
MAX_CHOICES = 64
MAX_BITS2 = 32
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
    """The lowest 1.x minor version that can hold tokens of `bits` bits, and a tCRC chunk (1.x writers)."""
    if token_crc:
        return 2
    return 1 if bits > MAX_BITS_V1_0 else 0


def token_crc(tokens) -> bytes:
    """The tCRC chunk's content: CRC-32 of the token grid in raster order, each token a little-endian u64."""
    import numpy as np

    grid = np.ascontiguousarray(np.asarray(tokens, dtype="<u8"))
    return struct.pack("<I", zlib.crc32(grid.tobytes()))


@dataclass
class SecondStage:
    """The second token stage of a 2.1 file: its geometry, model, budget-map table, token CRC and streams."""

    patch: int  # P2, pixels per second-stage token side; the first stage's P is a multiple of it
    bits: int  # L2, bits per second-stage token
    table: list[int]  # the budget map's table: one positive integer per choice of the stage's model
    model_hash: bytes  # the first 16 bytes of the stage's model hash
    token_crc: int  # CRC-32 of the second-stage tokens (section 11)
    streams: list[bytes] = field(default_factory=list)  # the map's stream, then pass 0 of every band, pass 1 of every band, ...

    def bands(self, header: "Header") -> int:
        """Bands of BAND2 second-stage token rows (the first stage's rows times P / P2)."""
        return -(-header.grid[0] * (header.patch // self.patch) // BAND2)

    def validate(self, header: "Header") -> None:
        if header.major != 2 or header.minor < 1:
            raise FormatError("a second stage needs format version 2.1")
        if not (1 <= self.patch <= 64) or header.patch % self.patch:
            raise FormatError(f"bad second-stage patch {self.patch} (a divisor of the patch {header.patch})")
        if not (1 <= self.bits <= MAX_BITS2):
            raise FormatError(f"bad second-stage token bits {self.bits}")
        if not (2 <= len(self.table) <= MAX_CHOICES) or min(self.table) < 1:
            raise FormatError("bad budget-map table")
        if len(self.model_hash) != HASH_BYTES[2]:
            raise FormatError("bad second-stage model hash")
        nb = self.bands(header)
        if len(self.streams) not in [1 + q * nb for q in PASSES2]:
            raise FormatError(f"the second stage has {len(self.streams)} streams, its geometry needs "
                              + " or ".join(str(1 + q * nb) for q in PASSES2))

    def passes(self, header: "Header") -> int:
        """Passes of each band: 2 (the checker context) or 4 (quad3x3), from the count of streams."""
        return (len(self.streams) - 1) // self.bands(header)

    def chunk(self) -> bytes:
        """The Rstg chunk's content."""
        out = bytearray([self.patch, self.bits, len(self.table)])
        out += b"".join(varint(t) for t in self.table)
        out += self.model_hash + struct.pack("<I", self.token_crc)
        out += b"".join(varint(len(s)) for s in self.streams)
        return bytes(out)

    @classmethod
    def parse(cls, data: bytes, header: "Header") -> tuple["SecondStage", list[int]]:
        """The Rstg chunk's content -> (the stage without its streams, their lengths)."""
        r = _Reader(data)
        patch, bits, n = r.take(3, "Rstg chunk")
        if not (2 <= n <= MAX_CHOICES):
            raise FormatError("bad budget-map table")
        table = [r.varint("Rstg chunk") for _ in range(n)]
        model_hash = r.take(HASH_BYTES[2], "Rstg chunk")
        (crc,) = struct.unpack("<I", r.take(4, "Rstg chunk"))
        stage = cls(patch, bits, table, model_hash, crc)
        if not (1 <= patch <= 64) or header.patch % patch:  # checked before the count of lengths is computed
            raise FormatError(f"bad second-stage patch {patch} (a divisor of the patch {header.patch})")
        lengths = []
        while r.pos < len(data) and len(lengths) < 1 + max(PASSES2) * stage.bands(header):
            lengths.append(r.varint("Rstg chunk"))
        if r.pos != len(data):
            raise FormatError("bad Rstg chunk (more stream lengths than its geometry allows)")
        stage.streams = [b""] * len(lengths)
        stage.validate(header)
        return stage, lengths


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
    model_hash: bytes  # SHA-256 of the model's canonical weights: whole in 1.x, its first 16 bytes in 2.0
    colour: int = COLOUR_SRGB8
    minor: int = 0
    chunks: list[tuple[bytes, bytes]] = field(default_factory=list)  # (4-byte type, data); Rstg is `second`'s
    major: int = MAJOR
    second: SecondStage | None = None  # 2.1: the second token stage

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
        if self.major not in MINORS:
            raise VersionError(f"unsupported .bsq version {self.major}.{self.minor}")
        if not (1 <= self.width <= MAX_DIM and 1 <= self.height <= MAX_DIM):
            raise LimitError(f"image dimensions {self.width}x{self.height} are outside 1..{MAX_DIM}")
        if self.colour != COLOUR_SRGB8:
            raise FormatError(f"unknown colour type {self.colour}")
        if not (1 <= self.patch <= 64):
            raise FormatError(f"bad patch size {self.patch}")
        if not (1 <= self.bits <= 48) or self.groups < 1 or self.bits % self.groups or self.bits // self.groups > 12:
            raise FormatError(f"bad token geometry: {self.bits} bits in {self.groups} groups")
        if self.bits > MAX_BITS_V1_0 and self.major == 1 and self.minor < 1:
            raise FormatError(f"{self.bits}-bit tokens need format version 1.1")
        if not (1 <= self.tile_rows <= 1024 and 1 <= self.tile_cols <= 1024):
            raise FormatError(f"bad tile shape {self.tile_rows}x{self.tile_cols}")
        if not (1 <= len(self.preset) <= MAX_NAME) or not _NAME_RE.match(self.preset):
            raise FormatError("bad preset name")
        if len(self.model_hash) != HASH_BYTES[self.major]:
            raise FormatError(f"model hash must be {HASH_BYTES[self.major]} bytes")
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
        if any(t == SECOND for t, _ in self.chunks):
            raise FormatError("the Rstg chunk is written from the header's second stage, not given as a chunk")
        if self.second is not None:
            self.second.validate(self)


def pack(header: Header, streams: list[bytes]) -> bytes:
    """Header and per-tile streams -> the bytes of a .bsq file (in the header's version)."""
    header.validate()
    if len(streams) != header.tiles:
        raise ValueError(f"{header.tiles} tiles but {len(streams)} streams")
    name = header.preset.encode("ascii")
    out = bytearray(
        _FIXED.pack(MAGIC, header.major, header.minor, 0, header.width, header.height, header.colour,
                    header.patch, header.bits, header.groups, header.tile_rows, header.tile_cols, len(name))
    )
    out += name
    out += header.model_hash
    if header.major == 1:
        out += struct.pack("<I", len(streams))
        out += b"".join(struct.pack("<I", len(s)) for s in streams)
        out += struct.pack("<H", len(header.chunks))
        for t, d in header.chunks:
            out += t + struct.pack("<I", len(d)) + d
    else:
        chunks = header.chunks + ([(SECOND, header.second.chunk())] if header.second is not None else [])
        if len(chunks) > MAX_CHUNKS:
            raise FormatError("too many chunks")
        out += b"".join(varint(len(s)) for s in streams)
        out += bytes([len(chunks)])
        for t, d in chunks:
            out += t + varint(len(d)) + d
    out += struct.pack("<I", zlib.crc32(out))
    payload = b"".join(streams)
    out += payload + struct.pack("<I", zlib.crc32(payload))
    if header.second is not None:
        payload2 = b"".join(header.second.streams)
        out += payload2 + struct.pack("<I", zlib.crc32(payload2))
    return bytes(out)


def first_stage(data: bytes, preset: str) -> bytes:
    """A 2.1 file cut to its first token grid: the 2.0 file of its first stage (named `preset`)."""
    header, streams = unpack(data)
    if header.second is None:
        return bytes(data)
    header.second, header.minor, header.preset = None, 0, preset
    return pack(header, streams)


MAX_VARINT_BYTES = 4  # lengths below 2^28


def varint(n: int) -> bytes:
    """A length as the format's varint: LEB128 of at most MAX_VARINT_BYTES bytes."""
    if not 0 <= n < 1 << (7 * MAX_VARINT_BYTES):
        raise ValueError(f"length {n} does not fit a varint of {MAX_VARINT_BYTES} bytes")
    return leb128(n)


def leb128(n: int) -> bytes:
    """Any n >= 0 as unsigned LEB128: 7 bits per byte, least significant first, high bit = more follow."""
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tile_count(width: int, height: int, patch: int, tile_rows: int, tile_cols: int) -> int:
    """Tiles of the geometry (section 3 of formats/bsq.md); the fields must be at least 1."""
    rows, cols = -(-height // patch), -(-width // patch)
    return -(-rows // tile_rows) * -(-cols // tile_cols)


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

    def varint(self, what: str) -> int:
        """An unsigned LEB128 varint of at most MAX_VARINT_BYTES bytes, in its shortest form."""
        n = 0
        for i in range(MAX_VARINT_BYTES):
            (b,) = self.take(1, what)
            n |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                if b == 0 and i:
                    raise FormatError(f"bad length in the {what} (not in its shortest form)")
                return n
        raise FormatError(f"bad length in the {what} (over {MAX_VARINT_BYTES} bytes)")


def unpack(data: bytes) -> tuple[Header, list[bytes]]:
    """Bytes of a .bsq file -> (header, streams). Raises a FormatError subclass on any defect."""
    data = bytes(data)
    if len(data) < 4 or data[:4] != MAGIC:
        raise FormatError("not a .bsq file (bad magic number)")
    r = _Reader(data)
    fixed = _FIXED.unpack(r.take(_FIXED.size, "header"))
    _, major, minor, flags, width, height, colour, patch, bits, groups, trows, tcols, nlen = fixed
    if major not in MINORS:
        readable = " and ".join(f"{m}.x" for m in MINORS)
        raise VersionError(f"unsupported .bsq version {major}.{minor} (this decoder reads {readable})")
    if nlen > MAX_NAME:
        raise FormatError("bad preset name length")
    name = r.take(nlen, "header")
    mhash = r.take(HASH_BYTES[major], "header")
    if major == 1:
        (ntiles,) = struct.unpack("<I", r.take(4, "header"))
        if ntiles > MAX_TILES:
            raise FormatError("bad tile count")
        lengths = struct.unpack(f"<{ntiles}I", r.take(4 * ntiles, "tile table"))
        (nchunks,) = struct.unpack("<H", r.take(2, "header"))
    else:  # the tile count follows from the geometry, so its fields are checked before the table is read
        if not (1 <= width <= MAX_DIM and 1 <= height <= MAX_DIM):
            raise LimitError(f"image dimensions {width}x{height} are outside 1..{MAX_DIM}")
        if not (1 <= patch <= 64) or not (1 <= trows <= 1024 and 1 <= tcols <= 1024):
            raise FormatError(f"bad token geometry: patch {patch}, tiles of {trows}x{tcols}")
        ntiles = tile_count(width, height, patch, trows, tcols)
        if ntiles > MAX_TILES:
            raise LimitError("too many tiles")
        lengths = [r.varint("tile table") for _ in range(ntiles)]
        (nchunks,) = r.take(1, "header")
    if nchunks > MAX_CHUNKS:
        raise FormatError("too many chunks")
    chunks = []
    for _ in range(nchunks):
        ctype = r.take(4, "chunk")
        if major == 1:
            (clen,) = struct.unpack("<I", r.take(4, "chunk"))
        else:
            clen = r.varint("chunk")
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
    second = [d for t, d in chunks if t == SECOND]
    chunks = [(t, d) for t, d in chunks if t != SECOND]
    header = Header(width, height, patch, bits, groups, trows, tcols, preset, mhash, colour, minor, chunks, major)
    header.validate()
    for t, _ in chunks:
        if t[:1].isupper():
            raise FormatError(f"unknown critical chunk {t.decode('ascii')!r}")
    lengths2 = None
    if second:
        if major != 2 or minor < 1:
            raise FormatError(f"unknown critical chunk 'Rstg' (a second stage needs format version 2.1, not {major}.{minor})")
        if len(second) > 1:
            raise FormatError("more than one Rstg chunk")
        header.second, lengths2 = SecondStage.parse(second[0], header)
    if ntiles != header.tiles:
        raise FormatError(f"tile table has {ntiles} entries, the geometry needs {header.tiles}")
    total = sum(lengths)
    payload = r.take(total, "payload")
    (pcrc,) = struct.unpack("<I", r.take(4, "payload checksum"))
    if lengths2 is not None:
        payload2 = r.take(sum(lengths2), "second-stage payload")
        (pcrc2,) = struct.unpack("<I", r.take(4, "second-stage payload checksum"))
    if r.pos != len(data):
        raise FormatError("trailing bytes after the payload checksum")
    if zlib.crc32(payload) != pcrc:
        raise ChecksumError("payload checksum mismatch (the file is corrupt)")
    if lengths2 is not None:
        if zlib.crc32(payload2) != pcrc2:
            raise ChecksumError("second-stage payload checksum mismatch (the file is corrupt)")
        header.second.streams = _split(payload2, lengths2)
    return header, _split(payload, lengths)


def _split(payload: bytes, lengths) -> list[bytes]:
    streams, pos = [], 0
    for n in lengths:
        streams.append(payload[pos : pos + n])
        pos += n
    return streams


def header_size(data: bytes) -> int:
    """Bytes before the payload (header, tile table, chunks, header CRC) of a valid file."""
    h, streams = unpack(data)
    tail = sum(len(s) for s in h.second.streams) + 4 if h.second is not None else 0
    return len(data) - sum(len(s) for s in streams) - 4 - tail
