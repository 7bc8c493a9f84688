import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bsqcodec import container
from bsqcodec.container import Header
from bsqcodec.errors import BsqError, ChecksumError, FormatError, LimitError, VersionError


@st.composite
def headers(draw):
    width = draw(st.integers(1, 3000))
    height = draw(st.integers(1, 3000))
    patch = draw(st.integers(1, 16))
    groups = draw(st.integers(1, 3))
    bits = groups * draw(st.integers(1, 12 if groups * 12 <= 32 else 32 // groups))
    name = draw(st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,20}", fullmatch=True))
    h = Header(width, height, patch, bits, groups, draw(st.integers(1, 64)), draw(st.integers(1, 64)), name,
               draw(st.binary(min_size=32, max_size=32)),
               chunks=draw(st.lists(st.tuples(st.sampled_from([b"iCCP", b"exIf", b"meta"]), st.binary(max_size=40)), max_size=3)))
    return h


def small(h: Header) -> bool:
    return h.tiles <= 2000


class TestContainer:
    @given(headers(), st.data())
    def test_round_trip(self, h, data):
        if not small(h):
            return
        streams = [data.draw(st.binary(max_size=12)) for _ in range(h.tiles)]
        blob = container.pack(h, streams)
        h2, s2 = container.unpack(blob)
        assert s2 == streams
        assert (h2.width, h2.height, h2.patch, h2.bits, h2.groups, h2.tile_rows, h2.tile_cols, h2.preset,
                h2.model_hash, h2.chunks) == (h.width, h.height, h.patch, h.bits, h.groups, h.tile_rows,
                                              h.tile_cols, h.preset, h.model_hash, h.chunks)

    def _blob(self):
        h = Header(40, 30, 4, 12, 2, 4, 5, "tiny", bytes(range(32)), chunks=[(b"iCCP", b"profile")])
        return container.pack(h, [bytes([i]) * 4 for i in range(h.tiles)])

    def test_every_truncation_is_rejected(self):
        blob = self._blob()
        for n in range(len(blob)):
            with pytest.raises(FormatError):
                container.unpack(blob[:n])

    def test_every_single_byte_change_is_detected(self):
        blob = self._blob()
        for i in range(len(blob)):
            for delta in (1, 0x80):
                bad = bytearray(blob)
                bad[i] = (bad[i] + delta) % 256
                with pytest.raises(BsqError):
                    container.unpack(bytes(bad))

    @given(st.binary(max_size=300))
    def test_arbitrary_bytes_after_magic(self, rest):
        with pytest.raises(BsqError):
            container.unpack(container.MAGIC + rest)

    def test_invalid_version(self):
        blob = bytearray(self._blob())
        blob[4] = 2
        with pytest.raises(VersionError, match="version 2"):
            container.unpack(bytes(blob))

    def test_invalid_payload_checksum(self):
        blob = bytearray(self._blob())
        blob[-6] ^= 1
        with pytest.raises(ChecksumError, match="payload"):
            container.unpack(bytes(blob))

    def test_invalid_dimensions(self):
        with pytest.raises(LimitError):
            Header(container.MAX_DIM + 1, 1, 4, 12, 2, 4, 5, "x", bytes(32)).validate()

    def _rebuild(self, blob: bytes, mutate) -> bytes:
        """Change the header fields and fix the header CRC, to reach the semantic checks."""
        h, streams = container.unpack(blob)
        hsize = container.header_size(blob)
        body = bytearray(blob[: hsize - 4])
        mutate(body)
        return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))) + blob[hsize:]

    def test_invalid_unknown_critical_chunk(self):
        blob = self._rebuild(self._blob(), lambda b: b.__setitem__(slice(b.index(b"iCCP"), b.index(b"iCCP") + 4), b"ICCP"))
        with pytest.raises(FormatError, match="critical chunk"):
            container.unpack(blob)

    def test_unknown_optional_chunk_is_skipped(self):
        blob = self._rebuild(self._blob(), lambda b: b.__setitem__(slice(b.index(b"iCCP"), b.index(b"iCCP") + 4), b"zzzz"))
        h, _ = container.unpack(blob)
        assert h.chunk(b"zzzz") == b"profile"

    def test_invalid_huge_dimensions_in_file(self):
        blob = self._rebuild(self._blob(), lambda b: b.__setitem__(slice(8, 12), struct.pack("<I", 10**6)))
        with pytest.raises(LimitError):
            container.unpack(blob)

    def test_invalid_trailing_bytes(self):
        with pytest.raises(FormatError, match="trailing"):
            container.unpack(self._blob() + b"\0")

    def test_header_size(self):
        blob = self._blob()
        h, streams = container.unpack(blob)
        assert container.header_size(blob) + sum(map(len, streams)) + 4 == len(blob)
