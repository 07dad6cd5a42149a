"""Fetching, caching and reading checkpoint files, and strict parameter matching.

``fetch_checkpoint`` turns a checkpoint URI from the config (a local path, ``file://``,
``http(s)://`` or ``gs://bucket/object``) into a local file and its sha256:

* local files are used in place (never copied);
* remote files are cached under ``cache_dir`` in a file named after the URL (a readable
  base name plus a hash of the whole URL), so two URLs never share a cache entry;
* a download goes to a temporary file in ``cache_dir`` and is renamed into place only when
  complete and (if an expected sha256 is given) verified, so a killed or corrupt download
  never looks cached, and concurrent jobs fetching the same URL are safe;
* nothing is downloaded unless ``allow_network`` is true: the default run is offline;
* each cached file has a checksum record next to it (``<file>.sha256``, JSON with its
  size and sha256, written before the file is renamed into place). Every cache hit is
  checked against it; a missing, truncated, altered or swapped cached file raises a
  CheckpointError naming the file and the fault and is deleted, so the next run
  downloads it again instead of extracting features from damaged weights.

``read_npz`` and ``read_npz_shapes`` read ``.npz`` checkpoints whose member names are
"/"-joined parameter paths (the big_vision / vision_transformer format);
``match_parameters`` compares a checkpoint with the parameters a model expects and lists
every missing, unexpected and mis-shaped parameter in one error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Mapping

import numpy as np

from pipeline_lib.backbones.efficientnet_lite import CheckpointMismatchError

__all__ = [
    "DEFAULT_CACHE_DIR",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "cache_path",
    "fetch_checkpoint",
    "match_parameters",
    "read_npz",
    "read_npz_shapes",
    "resolve_url",
    "save_npz",
    "sha256_file",
]

DEFAULT_CACHE_DIR = "~/.cache/dp_features/checkpoints"

_DOWNLOAD_BLOCK_BYTES = 1 << 20
_DOWNLOAD_TIMEOUT_S = 60


class CheckpointError(ValueError):
    """A checkpoint could not be fetched or failed its checksum."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A local checkpoint file does not exist, or a remote one is neither cached nor
    downloadable."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 digest of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_DOWNLOAD_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_url(uri: str) -> str | None:
    """The http(s) URL to download ``uri`` from, or None if it is a local file.

    ``gs://bucket/object`` maps to the public HTTPS endpoint of Google Cloud Storage,
    ``https://storage.googleapis.com/bucket/object`` (public buckets only; no credentials).
    """
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        return uri
    if scheme == "gs":
        bucket_and_object = uri[len("gs://") :]
        if "/" not in bucket_and_object.strip("/"):
            raise CheckpointError(f"{uri!r}: a gs:// URI needs a bucket and an object name")
        return "https://storage.googleapis.com/" + urllib.parse.quote(bucket_and_object)
    if scheme in ("", "file") or re.fullmatch(r"[a-zA-Z]", scheme):  # "C:\..." on Windows
        return None
    raise CheckpointError(
        f"{uri!r}: unsupported checkpoint location; use a local path, file://, http(s):// or "
        "gs://bucket/object"
    )


def _local_path(uri: str) -> str:
    if uri.lower().startswith("file://"):
        uri = urllib.parse.unquote(urllib.parse.urlsplit(uri).path)
    return os.path.abspath(os.path.expanduser(uri))


def cache_path(url: str, cache_dir: str | os.PathLike) -> str:
    """Where the download of ``url`` is cached: ``<cache_dir>/<urlhash16>-<base name>``."""
    base = os.path.basename(urllib.parse.urlsplit(url).path) or "checkpoint"
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", urllib.parse.unquote(base))[-150:]
    url_hash = hashlib.sha256(url.encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser(os.fspath(cache_dir)), f"{url_hash}-{base}")


def _checksum_error(uri: str, expected: str, got: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {uri}: sha256 mismatch: expected {expected}, got {got} ({what}). "
        "Check the URL and the sha256 in the config."
    )


def _record_path(path: str) -> str:
    return path + ".sha256"


def _write_record(path: str, size: int, sha256: str, url: str) -> None:
    record = _record_path(path)
    tmp = record + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"size": size, "sha256": sha256, "url": url}, f)
    os.replace(tmp, record)


def _cache_fault(uri: str, path: str, fault: str, detail: str, allow_network: bool, key: str):
    for p in (path, _record_path(path)):
        if os.path.exists(p):
            os.remove(p)
    how = (
        "rerun: it is downloaded again"
        if allow_network
        else f"set {key}: true in the config and rerun to download it again, or put a good "
        f"copy at {path} and give its sha256 in the config"
    )
    return CheckpointError(
        f"cached checkpoint {path} (of {uri}): {fault}: {detail}. It was not used and is "
        f"deleted from the cache. Repair: {how}"
    )


def _check_cached(uri: str, path: str, allow_network: bool, key: str) -> str:
    """The sha256 of the cached file at ``path``, checked against its checksum record."""
    try:
        with open(_record_path(path)) as f:
            record = json.load(f)
        size, recorded = int(record["size"]), str(record["sha256"])
    except FileNotFoundError:
        raise _cache_fault(
            uri, path, "checksum", "no checksum was recorded when it was cached", allow_network, key
        ) from None
    except (ValueError, KeyError, TypeError):
        raise _cache_fault(
            uri, path, "checksum", "its checksum record is unreadable", allow_network, key
        ) from None
    if not os.path.isfile(path):
        raise _cache_fault(
            uri,
            path,
            "missing",
            "the cached file is gone (its checksum record is left)",
            allow_network,
            key,
        )
    got_size = os.path.getsize(path)
    if got_size != size:
        raise _cache_fault(
            uri, path, "size", f"{got_size} bytes, {size} were downloaded", allow_network, key
        )
    got = sha256_file(path)
    if got != recorded:
        raise _cache_fault(
            uri, path, "checksum", "its bytes differ from what was downloaded", allow_network, key
        )
    return got


def _download(url: str, uri: str, dest: str, expected_sha256: str | None) -> str:
    """Download ``url`` to ``dest`` atomically; return the sha256 of what was written."""
    directory = os.path.dirname(dest)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".partial-", suffix=".tmp")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                    for block in iter(lambda: response.read(_DOWNLOAD_BLOCK_BYTES), b""):
                        digest.update(block)
                        out.write(block)
            except (urllib.error.URLError, OSError) as e:
                raise CheckpointError(f"checkpoint {uri}: download from {url} failed: {e}") from e
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if expected_sha256 is not None and got != expected_sha256:
            raise _checksum_error(uri, expected_sha256, got, f"downloaded from {url}; not cached")
        _write_record(dest, os.path.getsize(tmp), got, url)  # before the file appears
        os.replace(tmp, dest)
        return got
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fetch_checkpoint(
    uri: str,
    *,
    cache_dir: str | os.PathLike | None,
    sha256: str | None = None,
    allow_network: bool = False,
    config_key: str = "allow_network",
) -> tuple[str, str]:
    """(local path, sha256 hex digest) of the checkpoint at ``uri``.

    Args:
      uri: local path (``~`` expanded), ``file://``, ``http(s)://`` or ``gs://`` URI.
      cache_dir: directory of cached downloads (None: ``DEFAULT_CACHE_DIR``).
      sha256: expected hex digest, or None. The digest is always computed and returned;
        when given and different, this raises (naming the URI, both digests) and a
        cached or downloaded file is deleted, so a rerun cannot pick it up.
      allow_network: may a remote checkpoint that is not cached be downloaded?
      config_key: the config key that sets ``allow_network``, named in the error.
    """
    expected = sha256.lower() if sha256 else None
    url = resolve_url(uri)
    if url is None:
        path = _local_path(uri)
        if os.path.isdir(path):
            files = sorted(f for f in os.listdir(path) if f.endswith((".npz", ".safetensors")))[:10]
            raise CheckpointNotFoundError(
                f"checkpoint {path} is a directory (from {uri!r}); point the checkpoint at "
                "the weights file inside it"
                + (f", e.g. one of {files}" if files else " (it holds no .npz or .safetensors)")
            )
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(f"checkpoint file {path} does not exist (from {uri!r})")
        got = sha256_file(path)
        if expected is not None and got != expected:
            raise _checksum_error(uri, expected, got, f"local file {path}, left in place")
        return path, got

    path = cache_path(url, cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR)
    if os.path.isfile(path) and not os.path.isfile(_record_path(path)) and expected:
        got = sha256_file(path)  # cached before records existed: the config's digest decides
        if got == expected:
            _write_record(path, os.path.getsize(path), got, url)
    elif os.path.isfile(path) or os.path.isfile(_record_path(path)):
        got = _check_cached(uri, path, allow_network, config_key)
    if os.path.isfile(path):
        if expected is not None and got != expected:
            for p in (path, _record_path(path)):
                if os.path.exists(p):
                    os.remove(p)
            raise _checksum_error(uri, expected, got, f"cached file {path}, now deleted")
        return path, got
    if not allow_network:
        raise CheckpointNotFoundError(
            f"checkpoint {uri} is not in the cache ({path}) and network access is off. Set "
            f"{config_key}: true in the config to download it, or download {url} yourself "
            f"and put it at that path or point the checkpoint at a local file."
        )
    return path, _download(url, uri, path, expected)


# Reading .npz checkpoints.


def _recover_dtype(array: np.ndarray) -> np.ndarray:
    """Arrays saved from bfloat16 come back as 2-byte void; reinterpret them."""
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        import ml_dtypes

        return array.view(ml_dtypes.bfloat16)
    return array


def save_npz(path: str | os.PathLike, params: Mapping) -> None:
    """Write a (nested) parameter tree as big_vision does: an ``.npz`` with one member per
    parameter, named by its "/"-joined path (e.g. ``Transformer/encoder_norm/scale``)."""

    def flatten(tree: Mapping, prefix: str) -> dict[str, np.ndarray]:
        flat = {}
        for key, value in tree.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                flat.update(flatten(value, name + "/"))
            else:
                flat[name] = np.asarray(value)
        return flat

    np.savez(path, **flatten(params, ""))


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file: member name (without ``.npy``) -> array."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: _recover_dtype(npz[name]) for name in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable .npz checkpoint: {e}") from e


def read_npz_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Member name -> shape of an ``.npz`` file, from the array headers only (cheap)."""
    shapes = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                with archive.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, _ = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, _, _ = np.lib.format.read_array_header_2_0(f)
                shapes[member[: -len(".npy")]] = tuple(shape)
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable .npz checkpoint: {e}") from e
    return shapes


def match_parameters(
    found: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    *,
    source: str,
    notes: tuple[str, ...] = (),
    origin: Mapping[str, tuple[str, tuple[int, ...]]] | None = None,
) -> None:
    """Raise ``CheckpointMismatchError`` listing every missing, unexpected and mis-shaped
    parameter (name -> shape maps) at once; ``notes`` are added after the summary line.

    ``origin`` maps a converted name in ``found`` to (name, shape) in the file, so that
    problems are reported by the name the user sees in the file. A file parameter that
    was split into several model parameters (a fused qkv) is listed once.
    """
    origin = origin or {}
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    misshaped = sorted(
        k for k in expected.keys() & found.keys() if tuple(found[k]) != tuple(expected[k])
    )
    if not (missing or unexpected or misshaped):
        return
    lines = [f"  missing: {k} {tuple(expected[k])}" for k in missing]
    seen: set[str] = set()

    def named(key: str) -> str | None:
        """How the file names ``key``; None if that file parameter was listed already."""
        name, shape = origin.get(key, (key, tuple(found[key])))
        if name in seen:
            return None
        seen.add(name)
        return name if name == key else f"{name} {tuple(shape)} (as the model's {key})"

    for k in unexpected:
        if (name := named(k)) is not None:
            lines.append(f"  unexpected: {name}" + (f" {tuple(found[k])}" if name == k else ""))
    for k in misshaped:
        if (name := named(k)) is not None:
            lines.append(
                f"  mis-shaped: {name}: checkpoint {tuple(found[k])}, model {tuple(expected[k])}"
            )
    counts = [
        len(missing),
        len({origin.get(k, (k,))[0] for k in unexpected}),
        len({origin.get(k, (k,))[0] for k in misshaped}),
    ]
    header = (
        f"checkpoint {source} does not match the model: {counts[0]} missing, "
        f"{counts[1]} unexpected, {counts[2]} mis-shaped parameter(s)"
    )
    raise CheckpointMismatchError("\n".join([header, *notes, *lines]))
