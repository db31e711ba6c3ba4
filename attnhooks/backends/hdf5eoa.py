"""Reading an HDF5 file whose superblock says it ends before the data its writer wrote.

HDF5 keeps the file's end-of-allocation mark (EOA) in the superblock and checks every read against
it. A writer killed while it wrote in SWMR mode can leave the superblock's EOA behind the blocks it
allocated since its last flush while a block that points to them (a chunk index) was written: a
reader then fails with ``addr overflow, addr = A, size = S, eoa = E`` on every chunk that index
holds, committed steps included, although the bytes are in the file (seen once in ~300 kills under
load). :func:`open_past_eoa` reads such a file through a file object that shows the superblock as
``h5clear --increment`` would leave it, without writing anything: the EOA at the file's end, the
"open for writing" flags cleared, the checksum recomputed. The chunks still carry their checksums,
so a block the writer had not finished is found corrupt, not read as data.
"""

from __future__ import annotations

import io
import os
import struct

import h5py

__all__ = ["amended", "lookup3", "open_past_eoa"]

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HEAD = 48  # a version 2 or 3 superblock with 8-byte addresses: 44 bytes and its checksum
_EOA = slice(28, 36)


def open_past_eoa(path: str) -> h5py.File | None:
    """``path`` opened read-only with its superblock's EOA at the file's end (see the module docstring);
    None when its superblock (version 2 or 3, 8-byte addresses) does not end before the file does."""
    head = _read_head(path)
    if head is None or struct.unpack("<Q", head[_EOA])[0] >= os.path.getsize(path):
        return None
    view = _Amended(path, head)
    try:
        file = h5py.File(view, "r")
    except BaseException:
        view.close()
        raise
    file._attnhooks_raw = view  # closed with the file (close_file)
    return file


def close_file(file: h5py.File) -> None:
    """Close ``file`` (if open) and the Python file object it was opened through, if any (``_attnhooks_raw``:
    an amended view, or a reader's plain file handle)."""
    raw = getattr(file, "_attnhooks_raw", None)
    try:
        if file.id.valid:
            file.close()
    finally:
        if raw is not None:
            raw.close()


def amended(file: h5py.File) -> bool:
    """``file`` was opened by :func:`open_past_eoa`."""
    return isinstance(getattr(file, "_attnhooks_raw", None), _Amended)


class _Amended(io.RawIOBase):
    """The file at ``path``, read-only, with its first 48 bytes (its superblock ``head``) amended."""

    def __init__(self, path: str, head: bytes) -> None:
        self._raw = open(path, "rb")  # noqa: SIM115 - closed with this object
        size = os.fstat(self._raw.fileno()).st_size
        body = bytearray(head[:44])
        body[11] = 0  # file consistency flags: not open for writing (what h5clear clears)
        body[_EOA] = struct.pack("<Q", size)
        self._head = bytes(body) + struct.pack("<I", lookup3(bytes(body)))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        start = self._raw.tell()
        n = self._raw.readinto(buffer)
        if n and start < _HEAD:
            end = min(_HEAD, start + n)
            memoryview(buffer)[: end - start] = self._head[start:end]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _read_head(path: str) -> bytes | None:
    with open(path, "rb") as f:
        head = f.read(_HEAD)
    if len(head) < _HEAD or not head.startswith(_SIGNATURE) or head[8] not in (2, 3) or head[9:11] != b"\x08\x08":
        return None
    if struct.unpack("<I", head[44:48])[0] != lookup3(head[:44]):
        return None  # not a superblock this module understands: leave it to HDF5
    return head


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``, the checksum HDF5 gives its metadata (``H5_checksum_lookup3``)."""
    mask = 0xFFFFFFFF
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & mask
    i = 0
    while length > 12:
        a = (a + int.from_bytes(data[i : i + 4], "little")) & mask
        b = (b + int.from_bytes(data[i + 4 : i + 8], "little")) & mask
        c = (c + int.from_bytes(data[i + 8 : i + 12], "little")) & mask
        a, b, c = _mix(a, b, c)
        length -= 12
        i += 12
    if length == 0:
        return c
    tail = data[i : i + length] + bytes(12 - length)
    a = (a + int.from_bytes(tail[0:4], "little")) & mask
    b = (b + int.from_bytes(tail[4:8], "little")) & mask
    c = (c + int.from_bytes(tail[8:12], "little")) & mask
    return _final(a, b, c)


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & 0xFFFFFFFF


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    """lookup3's ``mix``: six steps, the words taken in turn (a from c then c += b; b from a then a += c; ...)."""
    v = [a, b, c]
    for i, r in enumerate((4, 6, 8, 16, 19, 4)):
        x, y, z = i % 3, (i + 1) % 3, (i + 2) % 3
        v[x] = ((v[x] - v[z]) & 0xFFFFFFFF) ^ _rot(v[z], r)
        v[z] = (v[z] + v[y]) & 0xFFFFFFFF
    return v[0], v[1], v[2]


def _final(a: int, b: int, c: int) -> int:
    """lookup3's ``final``: seven steps, c from b, a from c, b from a, in turn; returns c."""
    v = [a, b, c]
    for i, r in enumerate((14, 11, 25, 16, 4, 14, 24)):
        x, src = (2 + i) % 3, (1 + i) % 3
        v[x] = ((v[x] ^ v[src]) - _rot(v[src], r)) & 0xFFFFFFFF
    return v[2]
