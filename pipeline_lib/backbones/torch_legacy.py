"""Read legacy (pre-zip) PyTorch checkpoints with numpy only.

``torch.save`` before torch 1.6 (and later with ``_use_new_zipfile_serialization=False``)
writes one flat file:

1. four pickles, one after the other: a magic number, the protocol version (1001), a
   sys-info dict (endianness, C type sizes), and the object itself. Tensors inside the
   object are pickled as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
   ...)`` where ``storage`` is a *persistent id* ``('storage', StorageType, key, device,
   numel, view_metadata)``;
2. a fifth pickle: the list of storage keys, in the order their data follows;
3. for each key: an 8-byte element count, then the raw storage bytes.

This module reads that format without importing torch. The unpickler only resolves the
few globals a state dict needs (see ``ALLOWED_GLOBALS``); any other global, which could
execute arbitrary code under plain ``pickle``, is refused with an error naming the file
and the global. Tensors are returned as independent, writable numpy arrays that honour
the storage offset, size and stride of each tensor.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
from collections.abc import Mapping

import numpy as np

__all__ = [
    "ALLOWED_GLOBALS",
    "LEGACY_MAGIC_NUMBER",
    "LEGACY_PROTOCOL_VERSION",
    "TorchCheckpointError",
    "load_legacy_state_dict",
]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
_ZIP_MAGIC = b"PK\x03\x04"

# torch storage class name -> numpy dtype of one element.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2")}
    | {("torch", name) for name in _STORAGE_DTYPES}
)


class TorchCheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupt or uses something this reader refuses."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.<X>Storage`` classes: only remembers the element dtype."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    key: str
    storage_type: _StorageType
    numel: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    """A tensor whose storage bytes have not been read yet (they follow the pickles)."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: records where the tensor lives."""
    del requires_grad, backward_hooks, metadata  # Irrelevant for plain arrays.
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError(f"tensor storage is {type(storage).__name__}, not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in rank")
    return _TensorRef(storage, int(storage_offset), size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only ``ALLOWED_GLOBALS`` and torch storage persistent ids."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise TorchCheckpointError(
                f"{self._source}: refusing to unpickle global '{module}.{name}'. Only "
                f"{sorted(f'{m}.{n}' for m, n in ALLOWED_GLOBALS)} are allowed in a state "
                "dict; this file holds something else (or is malicious). Save only the "
                "state dict of tensors."
            )
        if module == "collections":
            return collections.OrderedDict
        if module == "torch._utils":
            return _rebuild_tensor_v2
        return _StorageType(name, _STORAGE_DTYPES[name])

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"persistent id {pid!r} has no storage type")
        if view_metadata is not None:
            raise TorchCheckpointError(
                f"{self._source}: storage views (torch < 0.4 checkpoints) are not supported"
            )
        key = str(key)
        ref = self.storages.setdefault(key, _StorageRef(key, storage_type, int(numel)))
        if ref != _StorageRef(key, storage_type, int(numel)):
            raise pickle.UnpicklingError(f"storage {key} is described inconsistently")
        return ref


def _materialize(name: str, ref: _TensorRef, storage: np.ndarray, source: str) -> np.ndarray:
    if any(s < 0 for s in ref.size) or any(s < 0 for s in ref.stride) or ref.offset < 0:
        raise TorchCheckpointError(f"{source}: tensor '{name}' has a negative size/stride/offset")
    if 0 in ref.size:
        return np.zeros(ref.size, dtype=storage.dtype.newbyteorder("="))
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if last >= storage.size:
        raise TorchCheckpointError(
            f"{source}: tensor '{name}' (offset {ref.offset}, size {ref.size}, stride "
            f"{ref.stride}) reads past the end of its storage of {storage.size} elements"
        )
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset :],
        shape=ref.size,
        strides=tuple(s * item for s in ref.stride),
        writeable=False,
    )
    return np.array(view, dtype=storage.dtype.newbyteorder("="), copy=True)


def _tensors_in(obj, source: str) -> dict[str, _TensorRef]:
    if not isinstance(obj, Mapping):
        raise TorchCheckpointError(
            f"{source}: expected a state dict (mapping of names to tensors), got "
            f"{type(obj).__name__}"
        )
    bad = [
        f"{k!r} ({type(v).__name__})"
        for k, v in obj.items()
        if not (isinstance(k, str) and isinstance(v, _TensorRef))
    ]
    if bad:
        raise TorchCheckpointError(
            f"{source}: expected a flat state dict of tensors; these entries are not "
            f"name -> tensor: {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}"
        )
    return dict(obj)


def load_legacy_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a legacy-format torch state dict file into ``{name: numpy array}``.

    Raises:
      TorchCheckpointError: naming the file and the problem, if the file is a zip-format
        checkpoint, has a bad magic number or protocol, is truncated or has trailing data,
        refers to a disallowed pickle global, or is not a flat dict of tensors.
    """
    source = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(_ZIP_MAGIC):
        raise TorchCheckpointError(
            f"{source}: this is a zip-format torch checkpoint (the torch >= 1.6 default); "
            "this reader handles only the legacy format. Re-save it with torch.save(sd, path, "
            "_use_new_zipfile_serialization=False)."
        )
    stream = io.BytesIO(data)
    unpickler = _RestrictedUnpickler(stream, source)

    def load(what: str):
        try:
            return unpickler.load()
        except TorchCheckpointError:
            raise
        except Exception as e:  # EOFError, UnpicklingError, ValueError, ...
            raise TorchCheckpointError(
                f"{source}: cannot read the {what} at byte {stream.tell()} of {len(data)} "
                f"(truncated or not a legacy torch checkpoint): {type(e).__name__}: {e}"
            ) from e

    magic = load("magic number")
    if magic != LEGACY_MAGIC_NUMBER:
        raise TorchCheckpointError(
            f"{source}: bad magic number {magic!r}; not a legacy torch checkpoint"
        )
    protocol = load("protocol version")
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise TorchCheckpointError(
            f"{source}: unsupported protocol version {protocol!r} "
            f"(expected {LEGACY_PROTOCOL_VERSION})"
        )
    sys_info = load("sys info")
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise TorchCheckpointError(
            f"{source}: sys info {sys_info!r} does not describe a little-endian file"
        )
    tensors = _tensors_in(load("state dict"), source)
    keys = load("storage key list")
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(unpickler.storages):
        raise TorchCheckpointError(
            f"{source}: the storage key list does not match the storages the tensors use"
        )

    storages: dict[str, np.ndarray] = {}
    offset = stream.tell()
    for key in map(str, keys):
        ref = unpickler.storages[key]
        dtype = ref.storage_type.dtype
        if offset + 8 > len(data):
            raise TorchCheckpointError(
                f"{source}: truncated: the element count of storage {key} is missing "
                f"(file has {len(data)} bytes)"
            )
        (numel,) = struct.unpack_from("<q", data, offset)
        if numel != ref.numel:
            raise TorchCheckpointError(
                f"{source}: storage {key} has {numel} elements on disk but {ref.numel} in "
                "the pickle; the file is corrupt"
            )
        offset += 8
        nbytes = numel * dtype.itemsize
        if offset + nbytes > len(data):
            raise TorchCheckpointError(
                f"{source}: truncated: storage {key} needs {nbytes} bytes at byte {offset}, "
                f"but the file has only {len(data)} bytes"
            )
        storages[key] = np.frombuffer(data, dtype=dtype, count=numel, offset=offset)
        offset += nbytes
    if offset != len(data):
        raise TorchCheckpointError(
            f"{source}: {len(data) - offset} unexpected trailing bytes after the last storage"
        )
    return {
        name: _materialize(name, ref, storages[ref.storage.key], source)
        for name, ref in tensors.items()
    }
