"""read_idx: round trips, and a specific error for each way a file can be bad."""

from __future__ import annotations

import gzip
import re
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline_lib.data.idx import IDX_DTYPES, IdxFormatError, read_idx, write_idx


def _idx_bytes(code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + payload


def _write(path, data: bytes, *, gz: bool = True):
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _raises(path, pattern: str):
    """Assert read_idx fails with a message that starts with the path and matches pattern."""
    with pytest.raises(IdxFormatError) as info:
        read_idx(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert re.search(pattern, message), message
    return message


def test_small_file_round_trips_gz_and_plain(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    for name in ("x-idx3-ubyte.gz", "x-idx3-ubyte"):
        write_idx(tmp_path / name, images)
        out = read_idx(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (3, 4, 5)
        np.testing.assert_array_equal(out, images)
    # The .gz file really is gzipped and the plain one is not.
    assert (tmp_path / "x-idx3-ubyte.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert (tmp_path / "x-idx3-ubyte").read_bytes()[:4] == b"\x00\x00\x08\x03"


def test_reads_big_endian_values_by_hand(tmp_path):
    # Two int32 values written by hand, big-endian: 1 and -2.
    data = _idx_bytes(0x0C, (2,), b"\x00\x00\x00\x01\xff\xff\xff\xfe")
    out = read_idx(_write(tmp_path / "v.gz", data))
    assert out.dtype == np.dtype("int32") and out.dtype.isnative
    np.testing.assert_array_equal(out, [1, -2])


@settings(max_examples=40, deadline=None)
@given(
    code=st.sampled_from(sorted(IDX_DTYPES)),
    shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
    gz=st.booleans(),
    data=st.data(),
)
def test_round_trip_every_dtype(tmp_path_factory, code, shape, gz, data):
    dtype = IDX_DTYPES[code].newbyteorder("=")
    array = data.draw(hnp.arrays(dtype, shape))
    path = tmp_path_factory.mktemp("idx") / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, array)
    out = read_idx(path)
    assert out.dtype == dtype and out.shape == array.shape
    np.testing.assert_array_equal(out.view(np.uint8), array.view(np.uint8))  # bitwise, NaN-safe


def test_wrong_magic(tmp_path):
    path = _write(tmp_path / "bad-magic.gz", b"\x01\x02\x08\x01" + b"\x00" * 8)
    _raises(path, r"bad magic number 0x01020801: an IDX file starts with two zero bytes")


def test_unknown_dtype_code(tmp_path):
    path = _write(tmp_path / "bad-dtype.gz", _idx_bytes(0x07, (2,), b"\x00\x00"))
    message = _raises(path, r"unknown IDX dtype code 0x07")
    assert "0x08 (uint8)" in message and "0x0E (float64)" in message


def test_zero_dimensions(tmp_path):
    path = _write(tmp_path / "zero-dims.gz", b"\x00\x00\x08\x00")
    _raises(path, r"header declares 0 dimensions")


def test_header_shorter_than_magic(tmp_path):
    path = _write(tmp_path / "short.gz", b"\x00\x00")
    _raises(path, r"too short for an IDX header: need 4 magic bytes, found 2")
    empty = _write(tmp_path / "empty", b"", gz=False)
    _raises(empty, r"too short for an IDX header: need 4 magic bytes, found 0")


def test_truncated_dimension_sizes(tmp_path):
    path = _write(tmp_path / "short-dims.gz", b"\x00\x00\x08\x03" + struct.pack(">I", 60000))
    _raises(path, r"truncated header: 3 dimensions need 12 bytes of sizes, found 4")


def test_truncated_payload_in_valid_gzip(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    _write(path, _idx_bytes(0x08, (60000, 28, 28), b"\x07" * 1000))
    message = _raises(path, r"truncated")
    assert message == (
        f"{path}: truncated: header says 60000x28x28 = 47040000 bytes of data, found 1000"
    )


def test_truncated_payload_multibyte_dtype_names_dtype(tmp_path):
    path = _write(tmp_path / "f.gz", _idx_bytes(0x0D, (10, 3), b"\x00" * 100))
    _raises(
        path,
        re.escape(
            "truncated: header says 10x3 float32 values (4 bytes each) = 120 bytes of data, "
            "found 100"
        ),
    )


def test_trailing_bytes(tmp_path):
    for gz in (True, False):
        path = _write(
            tmp_path / ("trailing.gz" if gz else "trailing"),
            _idx_bytes(0x08, (2, 3), bytes(6) + b"junk"),
            gz=gz,
        )
        _raises(
            path,
            re.escape("trailing bytes: header says 2x3 = 6 bytes of data, found 10 (4 extra)"),
        )


def test_corrupt_gzip_flipped_bytes(tmp_path):
    rng = np.random.default_rng(0)
    payload = rng.integers(0, 256, size=5000, dtype=np.uint8).tobytes()
    blob = bytearray(gzip.compress(_idx_bytes(0x08, (5000,), payload)))
    for i in range(len(blob) // 2, len(blob) // 2 + 16):
        blob[i] ^= 0xFF
    path = tmp_path / "corrupt.gz"
    path.write_bytes(bytes(blob))
    _raises(path, r"corrupt gzip stream \(")


def test_corrupt_gzip_cut_short(tmp_path):
    blob = gzip.compress(_idx_bytes(0x08, (4, 4), bytes(range(16))))
    path = tmp_path / "cut.gz"
    path.write_bytes(blob[:-6])  # drop most of the CRC/length trailer
    _raises(path, r"corrupt gzip stream \(EOFError")


def test_bad_crc_is_caught(tmp_path):
    blob = bytearray(gzip.compress(_idx_bytes(0x08, (4,), b"\x01\x02\x03\x04")))
    blob[-8] ^= 0xFF  # first byte of the CRC32 trailer
    path = tmp_path / "crc.gz"
    path.write_bytes(bytes(blob))
    _raises(path, r"corrupt gzip stream \(BadGzipFile: CRC check failed")


def test_absurd_header_does_not_allocate(tmp_path):
    # 4e9 x 4e9 x 4e9 bytes: must be reported as truncated, not attempted as one allocation.
    path = _write(tmp_path / "huge.gz", _idx_bytes(0x08, (4_000_000_000,) * 3, b"\x00" * 10))
    _raises(path, r"truncated: header says 4000000000x4000000000x4000000000 = \d+ bytes")


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope.gz")


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="no IDX code"):
        write_idx(tmp_path / "u16.idx", np.zeros(3, dtype=np.uint16))
