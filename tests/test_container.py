import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bsqcodec.format import container
from bsqcodec.format.container import Header
from bsqcodec.errors import BsqError, ChecksumError, FormatError, LimitError, VersionError


@st.composite
def headers(draw):
    width = draw(st.integers(1, 3000))
    height = draw(st.integers(1, 3000))
    patch = draw(st.integers(1, 16))
    groups = draw(st.integers(1, 3))
    bits = groups * draw(st.integers(1, 12 if groups * 12 <= 32 else 32 // groups))
    name = draw(st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,20}", fullmatch=True))
    major = draw(st.sampled_from(sorted(container.MINORS)))
    h = Header(width, height, patch, bits, groups, draw(st.integers(1, 64)), draw(st.integers(1, 64)), name,
               draw(st.binary(min_size=container.HASH_BYTES[major], max_size=container.HASH_BYTES[major])),
               chunks=draw(st.lists(st.tuples(st.sampled_from([b"iCCP", b"exIf", b"meta"]),
                                              st.binary(max_size=200)), max_size=3)), major=major)
    return h


def small(h: Header) -> bool:
    return h.tiles <= 2000


class TestContainer:
    @given(headers(), st.data())
    def test_round_trip(self, h, data):
        if not small(h):
            return
        streams = [data.draw(st.binary(max_size=300)) for _ in range(h.tiles)]
        blob = container.pack(h, streams)
        h2, s2 = container.unpack(blob)
        assert s2 == streams
        assert h2 == h

    def _blob(self, major=container.MAJOR):
        h = Header(40, 30, 4, 12, 2, 4, 5, "tiny", bytes(range(container.HASH_BYTES[major])),
                   chunks=[(b"iCCP", b"profile")], major=major)
        return container.pack(h, [bytes([i]) * (4 + 50 * i) for i in range(h.tiles)])  # lengths of 1 and 2 bytes

    @pytest.mark.parametrize("major", [1, 2])
    def test_every_truncation_is_rejected(self, major):
        blob = self._blob(major)
        for n in range(len(blob)):
            with pytest.raises(FormatError):
                container.unpack(blob[:n])

    @pytest.mark.parametrize("major", [1, 2])
    def test_every_single_byte_change_is_detected(self, major):
        blob = self._blob(major)
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
        for major in (0, 3):
            blob = bytearray(self._blob())
            blob[4] = major
            with pytest.raises(VersionError, match=f"version {major}"):
                container.unpack(bytes(blob))

    def test_version_2_header_is_the_1_2_header_less_its_fixed_width_fields(self):
        # kodim01's layout: 24 streams of 200..600 bytes, a tCRC chunk
        streams = [bytes(200 + 17 * i) for i in range(24)]
        chunks = [(container.TOKEN_CRC, bytes(4))]
        old = Header(768, 512, 8, 16, 2, 16, 16, "default", bytes(32), minor=2, chunks=chunks, major=1)
        new = Header(768, 512, 8, 16, 2, 16, 16, "default", bytes(16), chunks=chunks, major=2)
        a, b = container.header_size(container.pack(old, streams)), container.header_size(container.pack(new, streams))
        # 16 hash bytes, the 4-byte tile count, 2 of each 4-byte length, 1 of the chunk count, 3 of the chunk length
        assert (a, a - b) == (182, 16 + 4 + 2 * 24 + 1 + 3)

    @pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16383, 16384, 2**28 - 1])
    def test_varints(self, n):
        b = container.varint(n)
        assert len(b) == max(1, -(-n.bit_length() // 7))
        r = container._Reader(b)
        assert r.varint("tile table") == n and r.pos == len(b)

    def test_bad_varints_are_refused(self):
        with pytest.raises(ValueError):
            container.varint(2**28)
        for bad, why in ((b"\x80\x00", "shortest"), (b"\xff\xff\xff\xff\x01", "over 4"), (b"\x80", "truncated")):
            with pytest.raises(FormatError, match=why):
                container._Reader(bad).varint("tile table")

    @pytest.mark.parametrize("offset, size", [(17, 1), (20, 2), (22, 2)])  # patch, tile rows, tile cols
    def test_a_version_2_geometry_without_tiles_is_refused_before_the_table(self, offset, size):
        blob = bytearray(self._blob(2))
        blob[offset : offset + size] = bytes(size)  # 0: no tile count follows from it
        with pytest.raises(FormatError, match="geometry"):
            container.unpack(bytes(blob))

    def test_invalid_payload_checksum(self):
        blob = bytearray(self._blob())
        blob[-6] ^= 1
        with pytest.raises(ChecksumError, match="payload"):
            container.unpack(bytes(blob))

    def test_invalid_dimensions(self):
        with pytest.raises(LimitError):
            Header(container.MAX_DIM + 1, 1, 4, 12, 2, 4, 5, "x", bytes(16)).validate()

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


class TestSecondStage:
    """2.1: a second token stage (section 11): its chunk, its payload after the first, and the cut back to 2.0."""

    def _pair(self):
        h = Header(40, 150, 8, 12, 2, 4, 5, "tiny", bytes(range(16)), chunks=[(b"tCRC", b"\1\2\3\4")])
        streams = [bytes([i]) * (3 + i) for i in range(h.tiles)]
        # second grid: 19 rows of 8-pixel tokens, 4-pixel tokens below: 38 rows, one band
        second = container.SecondStage(4, 24, [5, 1, 3], bytes(range(16, 32)), 0xDEADBEEF,
                                       [b"map", b"p0", b"p1"])
        two = Header(40, 150, 8, 12, 2, 4, 5, "tiny-r", bytes(range(16)), minor=1,
                     chunks=[(b"tCRC", b"\1\2\3\4")], second=second)
        return h, two, streams

    def test_round_trip_and_the_cut_to_the_first_grid(self):
        h, two, streams = self._pair()
        blob = container.pack(two, streams)
        h2, s2 = container.unpack(blob)
        assert h2 == two and s2 == streams and h2.second.streams == [b"map", b"p0", b"p1"]
        assert container.first_stage(blob, "tiny") == container.pack(h, streams)  # the first stage's own 2.0 file
        assert container.header_size(blob) == len(blob) - sum(map(len, streams)) - 4 - (3 + 4 + 4)

    def test_bands_follow_the_second_grid(self):
        h, two, streams = self._pair()
        two.height = 8 * 40  # 40 first-stage rows, 80 second-stage rows: two bands of 64
        two.second.streams = [b"m", b"a", b"b", b"c", b"d"]
        two.tile_rows = 64
        assert two.second.bands(two) == 2
        h2, s2 = container.unpack(container.pack(two, [b"x"] * two.tiles))
        assert h2.second.streams == [b"m", b"a", b"b", b"c", b"d"]
        two.second.streams = [b"m", b"a", b"b"]
        with pytest.raises(FormatError, match="streams"):
            container.pack(two, [b"x"] * two.tiles)

    def test_every_truncation_and_byte_change_is_rejected(self):
        _, two, streams = self._pair()
        blob = container.pack(two, streams)
        for n in range(len(blob)):
            with pytest.raises(FormatError):
                container.unpack(blob[:n])
        for i in range(len(blob)):
            bad = bytearray(blob)
            bad[i] ^= 0x10
            with pytest.raises(BsqError):
                container.unpack(bytes(bad))
        with pytest.raises(FormatError, match="trailing"):
            container.unpack(blob + b"\0")

    def _with_chunk(self, data: bytes, minor=1, major=2):
        """A file whose header holds this Rstg chunk content (CRCs right), with the second payload it names."""
        h, _, streams = self._pair()
        h.major, h.minor = major, minor
        raw = bytearray(container.pack(h, streams))
        # rebuild by hand: the chunk count byte and the chunk go before the header CRC
        head_end = container.header_size(bytes(raw))
        body = raw[: head_end - 4]
        tcrc_at = body.rindex(b"tCRC")
        body[tcrc_at - 1] += 1  # chunk count
        body += b"Rstg" + container.varint(len(data)) + data
        body += struct.pack("<I", zlib.crc32(bytes(body)))
        payload = b"".join(streams)
        tail = b"map" + b"p0" + b"p1"
        return bytes(body) + payload + struct.pack("<I", zlib.crc32(payload)) + tail + struct.pack("<I", zlib.crc32(tail))

    def test_a_hand_built_file_reads_and_each_bad_field_is_named(self):
        ok = bytes([4, 24, 3]) + bytes([5, 1, 3]) + bytes(range(16, 32)) + struct.pack("<I", 7) + bytes([3, 2, 2])
        h, _ = container.unpack(self._with_chunk(ok))
        assert h.second.patch == 4 and h.second.table == [5, 1, 3] and h.second.streams == [b"map", b"p0", b"p1"]
        assert h.second.passes(h) == 2
        quad, _ = container.unpack(self._with_chunk(ok + bytes([0, 0])))  # four passes of the one band
        assert quad.second.streams == [b"map", b"p0", b"p1", b"", b""] and quad.second.passes(quad) == 4
        cases = {
            "version 2.1": self._with_chunk(ok, minor=0),
            "second-stage patch": self._with_chunk(bytes([3]) + ok[1:]),  # not a divisor of 8
            "token bits": self._with_chunk(bytes([4, 33]) + ok[2:]),
            "budget-map table": self._with_chunk(bytes([4, 24, 3, 5, 0, 3]) + ok[6:]),  # a zero entry
            "geometry needs 3 or 5": self._with_chunk(ok + b"\0"),  # three passes
            "more stream lengths": self._with_chunk(ok + bytes(3)),
        }
        for what, blob in cases.items():
            with pytest.raises(FormatError, match=what):
                container.unpack(blob)
        with pytest.raises(FormatError, match="budget-map table"):
            container.unpack(self._with_chunk(bytes([4, 24, 1, 5]) + ok[6:]))  # one choice

    def test_the_rstg_chunk_is_not_a_plain_chunk(self):
        h, _, streams = self._pair()
        h.chunks = [(b"Rstg", b"")]
        with pytest.raises(FormatError, match="Rstg"):
            container.pack(h, streams)
