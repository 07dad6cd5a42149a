"""The numpy-only legacy torch reader, on crafted files and on the real Lite0 checkpoint.

Crafted files are written here without torch: a small pickler emits the same opcodes
``torch.save(..., _use_new_zipfile_serialization=False)`` does (GLOBAL references to
``torch._utils._rebuild_tensor_v2`` / ``torch.FloatStorage``, storages as persistent ids),
followed by the raw storages.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys

import numpy as np
import pytest

from pipeline_lib.backbones.torch_legacy import (
    LEGACY_MAGIC_NUMBER,
    TorchCheckpointError,
    load_legacy_state_dict,
)

_STORAGE_NAMES = {
    np.dtype("float32"): "FloatStorage",
    np.dtype("int64"): "LongStorage",
    np.dtype("float16"): "HalfStorage",
    np.dtype("bool"): "BoolStorage",
    np.dtype("uint8"): "ByteStorage",
}


class _Global:
    """A reference to ``module.name`` written as a pickle GLOBAL, without importing it."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires reduce functions to be callable.
        raise AssertionError("never called")


class _Storage:
    def __init__(self, key: str, data: np.ndarray):
        self.key, self.data = key, np.ascontiguousarray(data).ravel()


class _Tensor:
    """Pickles like a torch tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        return (
            _Global("torch._utils", "_rebuild_tensor_v2"),
            (*self.args, False, collections.OrderedDict()),
        )


class _Evil:
    def __reduce__(self):
        return (_Global("os", "system"), ("echo pwned",))


class _LegacyPickler(pickle._Pickler):  # The pure-Python pickler lets us override save().
    def __init__(self, file):
        super().__init__(file, protocol=2)

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            kind = _Global("torch", _STORAGE_NAMES[obj.data.dtype])
            return ("storage", kind, obj.key, "cpu", obj.data.size, None)
        return None

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)


def legacy_bytes(state: dict, storages: list[_Storage], *, magic=LEGACY_MAGIC_NUMBER) -> bytes:
    out = io.BytesIO()
    for header in (
        magic,
        1001,
        {
            "protocol_version": 1001,
            "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4},
        },
    ):
        pickle.dump(header, out, protocol=2)
    _LegacyPickler(out).dump(collections.OrderedDict(state))
    pickle.dump([s.key for s in storages], out, protocol=2)
    for s in storages:
        out.write(struct.pack("<q", s.data.size))
        out.write(s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())
    return out.getvalue()


def _example() -> tuple[dict, list[_Storage], dict[str, np.ndarray]]:
    """State dict covering dtypes, a 0-d tensor, a strided view with offset, shared storage."""
    rng = np.random.default_rng(0)
    w = _Storage("0", rng.normal(size=20).astype(np.float32))
    ints = _Storage("1", np.array([7], np.int64))
    half = _Storage("2", rng.normal(size=6).astype(np.float16))
    mask = _Storage("3", np.array([True, False, True]))
    state = {
        "conv.weight": _Tensor(w, 0, (2, 2, 5), (10, 5, 1)),
        "transposed": _Tensor(w, 4, (2, 3), (1, 2)),  # shares w; offset 4, stride (1, 2)
        "bn.num_batches_tracked": _Tensor(ints, 0, (), ()),
        "half": _Tensor(half, 0, (3, 2), (2, 1)),
        "mask": _Tensor(mask, 0, (3,), (1,)),
    }
    expected = {
        "conv.weight": w.data.reshape(2, 2, 5),
        "transposed": np.array(
            [[w.data[4], w.data[6], w.data[8]], [w.data[5], w.data[7], w.data[9]]]
        ),
        "bn.num_batches_tracked": np.array(7, np.int64),
        "half": half.data.reshape(3, 2),
        "mask": mask.data,
    }
    return state, [w, ints, half, mask], expected


@pytest.fixture
def example_file(tmp_path):
    state, storages, expected = _example()
    path = tmp_path / "example.pth"
    path.write_bytes(legacy_bytes(state, storages))
    return path, expected


def test_reads_crafted_file_exactly(example_file):
    path, expected = example_file
    got = load_legacy_state_dict(path)
    assert list(got) == list(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype, name
        assert got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    # Results are independent, writable copies, even where storages are shared.
    got["conv.weight"][0, 0, 4] = 123.0
    assert got["transposed"][0, 0] == expected["transposed"][0, 0]


def test_every_truncation_is_a_clear_error(example_file):
    path, _ = example_file
    data = path.read_bytes()
    truncated = path.with_name("truncated.pth")
    for length in range(len(data)):
        truncated.write_bytes(data[:length])
        with pytest.raises(TorchCheckpointError, match="truncated") as info:
            load_legacy_state_dict(truncated)
        assert str(truncated) in str(info.value), length


def test_trailing_bytes_are_an_error(example_file):
    path, _ = example_file
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(TorchCheckpointError, match="trailing"):
        load_legacy_state_dict(path)


def test_wrong_magic_number(tmp_path):
    state, storages, _ = _example()
    path = tmp_path / "bad_magic.pth"
    path.write_bytes(legacy_bytes(state, storages, magic=12345))
    with pytest.raises(TorchCheckpointError, match="bad magic number 12345") as info:
        load_legacy_state_dict(path)
    assert str(path) in str(info.value)


def test_not_a_pickle_at_all(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(TorchCheckpointError, match="noise.pth"):
        load_legacy_state_dict(path)


def test_zip_format_is_refused_with_advice(tmp_path):
    path = tmp_path / "new_format.pth"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(TorchCheckpointError, match="zip-format") as info:
        load_legacy_state_dict(path)
    assert str(path) in str(info.value)
    assert "_use_new_zipfile_serialization=False" in str(info.value)


def test_disallowed_global_is_refused_and_named(tmp_path):
    state, storages, _ = _example()
    state["payload"] = _Evil()
    path = tmp_path / "evil.pth"
    path.write_bytes(legacy_bytes(state, storages))
    with pytest.raises(TorchCheckpointError, match="'os.system'") as info:
        load_legacy_state_dict(path)
    assert str(path) in str(info.value)


def test_non_tensor_entries_are_refused(tmp_path):
    state, storages, _ = _example()
    state["epoch"] = 3
    path = tmp_path / "not_flat.pth"
    path.write_bytes(legacy_bytes(state, storages))
    with pytest.raises(TorchCheckpointError, match="'epoch' \\(int\\)"):
        load_legacy_state_dict(path)


def test_tensor_reading_past_its_storage(tmp_path):
    w = _Storage("0", np.zeros(4, np.float32))
    path = tmp_path / "overrun.pth"
    path.write_bytes(legacy_bytes({"w": _Tensor(w, 2, (3,), (1,))}, [w]))
    with pytest.raises(TorchCheckpointError, match="'w'.*past the end"):
        load_legacy_state_dict(path)


def test_real_lite0_checkpoint(lite0_state_dict):
    sd = lite0_state_dict
    assert len(sd) == 296
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280)
    assert sd["_bn0.num_batches_tracked"].dtype == np.int64
    floats = [a for a in sd.values() if a.dtype == np.float32]
    assert len(floats) == 296 - 49  # 49 BatchNorms, each with an int64 counter.
    assert all(np.isfinite(a).all() for a in floats)
    assert all((sd[k] >= 0).all() for k in sd if k.endswith("running_var"))  # some are 0
    assert "torch" not in sys.modules
