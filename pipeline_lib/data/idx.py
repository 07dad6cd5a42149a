"""Strict reader for IDX files (the MNIST / Fashion-MNIST container format).

An IDX file is a 4-byte magic number, then one big-endian uint32 size per
dimension, then the data in C order, big-endian. The magic number is two zero
bytes, a dtype code and the number of dimensions. Files are usually gzipped.

The reader trusts nothing: it checks the magic number, the dtype code, the
number of dimensions, that the payload holds exactly as many bytes as the
header declares (a truncated file and trailing bytes are both errors), and
that a gzip stream is intact (CRC and length are checked by reading to its
end). Every error names the file and the problem.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["IDX_DTYPES", "IdxFormatError", "read_idx", "write_idx"]

# dtype code (3rd magic byte) -> big-endian numpy dtype
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"
_READ_CHUNK_BYTES = 1 << 24  # read in 16 MiB pieces; never trust the header with one allocation


class IdxFormatError(ValueError):
    """An IDX file is malformed. The message names the file and the problem."""


def _fail(path: str | os.PathLike, problem: str) -> IdxFormatError:
    return IdxFormatError(f"{os.fspath(path)}: {problem}")


def _shape_str(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape)


def _read_exact(stream: BinaryIO, num_bytes: int) -> bytes:
    """Read up to ``num_bytes`` from ``stream``, fewer only at end of stream."""
    parts: list[bytes] = []
    remaining = num_bytes
    while remaining > 0:
        part = stream.read(min(remaining, _READ_CHUNK_BYTES))
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def _count_rest(stream: BinaryIO) -> int:
    """Count the bytes left in ``stream`` (reading, for gzip, to the CRC check)."""
    total = 0
    while True:
        part = stream.read(_READ_CHUNK_BYTES)
        if not part:
            return total
        total += len(part)


def _parse(stream: BinaryIO, path: str | os.PathLike) -> np.ndarray:
    magic = _read_exact(stream, 4)
    if len(magic) < 4:
        raise _fail(path, f"too short for an IDX header: need 4 magic bytes, found {len(magic)}")
    if magic[0] != 0 or magic[1] != 0:
        raise _fail(
            path,
            f"bad magic number 0x{magic.hex()}: an IDX file starts with two zero bytes, "
            "then a dtype code and the number of dimensions",
        )
    code, ndim = magic[2], magic[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X} ({IDX_DTYPES[c].name})" for c in sorted(IDX_DTYPES))
        raise _fail(path, f"unknown IDX dtype code 0x{code:02X}; known codes: {known}")
    if ndim == 0:
        raise _fail(path, "header declares 0 dimensions; an IDX array needs at least one")
    dtype = IDX_DTYPES[code]

    dims_raw = _read_exact(stream, 4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise _fail(
            path,
            f"truncated header: {ndim} dimensions need {4 * ndim} bytes of sizes, "
            f"found {len(dims_raw)}",
        )
    shape = tuple(int(n) for n in np.frombuffer(dims_raw, dtype=">u4"))
    expected = math.prod(shape) * dtype.itemsize
    if dtype.itemsize == 1:
        declared = f"header says {_shape_str(shape)} = {expected} bytes of data"
    else:
        declared = (
            f"header says {_shape_str(shape)} {dtype.name} values "
            f"({dtype.itemsize} bytes each) = {expected} bytes of data"
        )

    payload = _read_exact(stream, expected)
    if len(payload) < expected:
        raise _fail(path, f"truncated: {declared}, found {len(payload)}")
    extra = _count_rest(stream)
    if extra:
        raise _fail(path, f"trailing bytes: {declared}, found {expected + extra} ({extra} extra)")

    array = np.frombuffer(payload, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a gzipped or plain IDX file into a native-endian numpy array.

    Gzip is detected from the content (an IDX file cannot start with the gzip
    magic bytes, since its first two bytes are zero), so the file name does not
    matter.

    Raises:
      FileNotFoundError: the file does not exist.
      IdxFormatError: the file is not a well-formed IDX file or its gzip stream
        is corrupt; the message names the file and the problem.
    """
    path = Path(path)
    with open(path, "rb") as raw:
        is_gzip = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        if not is_gzip:
            return _parse(raw, path)
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                return _parse(stream, path)
        except (OSError, EOFError, zlib.error) as exc:
            # BadGzipFile is an OSError; a cut-off stream raises EOFError.
            raise _fail(path, f"corrupt gzip stream ({type(exc).__name__}: {exc})") from exc


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file (gzipped when ``compress`` or the name ends in .gz).

    Used by tests and tools to make small files; the dtype must be one IDX supports.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"{path}: dtype {array.dtype} has no IDX code")
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"{path}: IDX needs 1 to 255 dimensions, got {array.ndim}")
    header = (
        bytes([0, 0, codes[native], array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    )
    data = header + np.ascontiguousarray(array, dtype=native.newbyteorder(">")).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    path.write_bytes(gzip.compress(data) if compress else data)
