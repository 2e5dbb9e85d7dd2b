"""A small deterministic zip writer that can reuse already-compressed members.

``zipfile`` can only write members it compresses itself, one at a time. Packaging a
virtualenv is dominated by compression, so this writer (a) takes members compressed
elsewhere (in worker threads: ``zlib`` releases the GIL) and (b) copies members
verbatim out of an earlier zip, which is how a rebuild after a program edit avoids
recompressing the whole environment. Output is plain zip (zip64 where sizes, offsets
or the member count need it), readable by ``zipfile`` and ``zipimport``; every member
gets the same fixed timestamp, so equal inputs give equal bytes.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

STORED = 0
DEFLATED = 8
#: Sizes, offsets and counts at or above these get zip64 records (tests lower them).
ZIP64_SIZE = 0xFFFFFFFF
ZIP64_COUNT = 0xFFFF
_FF32 = 0xFFFFFFFF  # "see the zip64 record" placeholders
_FF16 = 0xFFFF

_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01
_DOS_TIME = 0


@dataclass(frozen=True)
class Member:
    """One member as written: enough to find its compressed bytes again later."""

    name: str
    method: int
    crc: int
    csize: int
    usize: int
    mode: int
    #: Offset of the local header, and of the compressed data, in the file.
    header_offset: int
    data_offset: int


def compress(data: bytes, level: int) -> tuple[int, int, bytes]:
    """``(method, crc32, payload)``: raw deflate, or stored when that is not smaller."""
    crc = zlib.crc32(data)
    if data:
        c = zlib.compressobj(level, zlib.DEFLATED, -15)
        payload = c.compress(data) + c.flush()
        if len(payload) < len(data):
            return DEFLATED, crc, payload
    return STORED, crc, data


class ZipWriter:
    """Writes members in the order given, then the central directory on ``close``."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.pos = f.tell()
        self.members: list[Member] = []

    def add(self, name: str, mode: int, method: int, crc: int, usize: int,
            payload: bytes) -> Member:
        """Append a member whose (already compressed) bytes are ``payload``."""
        raw = name.encode("utf-8")
        flags = 0 if raw.isascii() else 0x800
        csize = len(payload)
        big = usize >= ZIP64_SIZE or csize >= ZIP64_SIZE
        extra = struct.pack("<HHQQ", 1, 16, usize, csize) if big else b""
        header = struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 45 if big else 20, flags, method, _DOS_TIME,
            _DOS_DATE, crc, _FF32 if big else csize, _FF32 if big else usize,
            len(raw), len(extra)) + raw + extra
        m = Member(name, method, crc, csize, usize, mode, self.pos, self.pos + len(header))
        self.f.write(header)
        self.f.write(payload)
        self.pos = m.data_offset + csize
        self.members.append(m)
        return m

    def close(self) -> None:
        cd_offset = self.pos
        for m in self.members:
            raw = m.name.encode("utf-8")
            flags = 0 if raw.isascii() else 0x800
            z64: list[int] = []
            usize, csize, offset = m.usize, m.csize, m.header_offset
            if usize >= ZIP64_SIZE:
                z64.append(usize)
                usize = _FF32
            if csize >= ZIP64_SIZE:
                z64.append(csize)
                csize = _FF32
            if offset >= ZIP64_SIZE:
                z64.append(offset)
                offset = _FF32
            extra = struct.pack("<HH", 1, 8 * len(z64)) + struct.pack(
                f"<{len(z64)}Q", *z64) if z64 else b""
            self.f.write(struct.pack(
                "<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | (45 if z64 else 20),
                45 if z64 else 20, flags, m.method, _DOS_TIME, _DOS_DATE, m.crc, csize,
                usize, len(raw), len(extra), 0, 0, 0, (0o100000 | m.mode) << 16, offset))
            self.f.write(raw + extra)
        end = self.f.tell()
        cd_size = end - cd_offset
        count = len(self.members)
        if count >= ZIP64_COUNT or cd_size >= ZIP64_SIZE or cd_offset >= ZIP64_SIZE:
            self.f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, (3 << 8) | 45, 45, 0, 0,
                                     count, count, cd_size, cd_offset))
            self.f.write(struct.pack("<IIQI", 0x07064B50, 0, end, 1))
            self.f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, _FF16, _FF16, _FF32,
                                     _FF32, 0))
        else:
            self.f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, cd_size,
                                     cd_offset, 0))
        self.f.flush()
