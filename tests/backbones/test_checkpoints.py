"""fetch_checkpoint: local files, a cache keyed by URL, atomic downloads from a local HTTP
server, checksums, and no network unless allowed; the .npz readers and strict matching."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading

import numpy as np
import pytest

from pipeline_lib.backbones.checkpoints import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    cache_path,
    fetch_checkpoint,
    match_parameters,
    read_npz,
    read_npz_shapes,
    resolve_url,
    save_npz,
)

PAYLOAD = b"tiny checkpoint bytes " * 1000
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class _Server:
    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server({"/models/tiny.npz": PAYLOAD})
    yield s
    s.close()


def test_download_then_cache_hit_without_a_second_request(server, tmp_path):
    url = server.url + "/models/tiny.npz"
    path, sha256 = fetch_checkpoint(url, cache_dir=tmp_path, allow_network=True)
    assert sha256 == PAYLOAD_SHA256
    assert path == cache_path(url, tmp_path)
    assert os.path.dirname(path) == str(tmp_path)
    assert os.path.basename(path).endswith("-tiny.npz")  # Readable: ends in the file name.
    assert open(path, "rb").read() == PAYLOAD
    assert server.requests == ["/models/tiny.npz"]
    again = fetch_checkpoint(url, cache_dir=tmp_path, sha256=PAYLOAD_SHA256.upper())
    assert again == (path, PAYLOAD_SHA256)  # Cached: no network needed, no new request.
    assert server.requests == ["/models/tiny.npz"]
    name = os.path.basename(path)  # No temporary files; the file and its checksum record:
    assert sorted(os.listdir(tmp_path)) == [name, name + ".sha256"]


def test_checksum_mismatch_names_url_and_both_digests_and_caches_nothing(server, tmp_path):
    url = server.url + "/models/tiny.npz"
    with pytest.raises(CheckpointError) as info:
        fetch_checkpoint(url, cache_dir=tmp_path, sha256="ab" * 32, allow_network=True)
    message = str(info.value)
    assert url in message and "ab" * 32 in message and PAYLOAD_SHA256 in message
    assert os.listdir(tmp_path) == []


def test_a_corrupt_cached_file_is_reported_and_removed(server, tmp_path):
    url = server.url + "/models/tiny.npz"
    path = cache_path(url, tmp_path)
    with open(path, "wb") as f:
        f.write(b"truncated")
    with pytest.raises(CheckpointError, match="sha256 mismatch.*now deleted"):
        fetch_checkpoint(url, cache_dir=tmp_path, sha256=PAYLOAD_SHA256)
    assert not os.path.exists(path)
    _, sha256 = fetch_checkpoint(url, cache_dir=tmp_path, sha256=PAYLOAD_SHA256, allow_network=True)
    assert sha256 == PAYLOAD_SHA256


def test_no_network_unless_allowed(server, tmp_path):
    url = server.url + "/models/tiny.npz"
    with pytest.raises(CheckpointNotFoundError) as info:
        fetch_checkpoint(url, cache_dir=tmp_path, config_key="backbones.vit_b16.allow_network")
    message = str(info.value)
    assert "backbones.vit_b16.allow_network: true" in message
    assert cache_path(url, tmp_path) in message
    assert server.requests == []


def test_http_errors_are_reported_with_the_url(server, tmp_path):
    url = server.url + "/models/absent.npz"
    with pytest.raises(CheckpointError, match="absent.npz failed.*404"):
        fetch_checkpoint(url, cache_dir=tmp_path, allow_network=True)
    assert os.listdir(tmp_path) == []


def test_local_files_are_used_in_place(tmp_path):
    path = tmp_path / "model.npz"
    path.write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    assert fetch_checkpoint(str(path), cache_dir=cache) == (str(path), PAYLOAD_SHA256)
    assert fetch_checkpoint(f"file://{path}", cache_dir=cache) == (str(path), PAYLOAD_SHA256)
    assert not cache.exists()
    with pytest.raises(CheckpointError, match="sha256 mismatch.*left in place"):
        fetch_checkpoint(str(path), cache_dir=cache, sha256="0" * 64)
    assert path.exists()  # A user's own file is never deleted.


def test_missing_local_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint file .*missing.npz does not exist"):
        fetch_checkpoint(str(tmp_path / "missing.npz"), cache_dir=tmp_path)


def test_url_resolution():
    assert (
        resolve_url("gs://vit_models/augreg/B_16-i21k.npz")
        == "https://storage.googleapis.com/vit_models/augreg/B_16-i21k.npz"
    )
    assert resolve_url("https://example.org/a.npz") == "https://example.org/a.npz"
    assert resolve_url("/data/a.npz") is None
    assert resolve_url("file:///data/a.npz") is None
    with pytest.raises(CheckpointError, match="unsupported"):
        resolve_url("s3://bucket/a.npz")
    with pytest.raises(CheckpointError, match="bucket and an object"):
        resolve_url("gs://bucket")
    # Different URLs with the same file name get different cache entries.
    assert cache_path("https://a.org/x/m.npz", "/c") != cache_path("https://b.org/x/m.npz", "/c")


def test_npz_readers(tmp_path):
    path = tmp_path / "c.npz"
    arrays = {"Transformer/encoder_norm/scale": np.ones(4, np.float32), "cls": np.zeros((1, 1, 4))}
    np.savez(path, **arrays)
    assert read_npz_shapes(path) == {"Transformer/encoder_norm/scale": (4,), "cls": (1, 1, 4)}
    loaded = read_npz(path)
    assert loaded.keys() == arrays.keys()
    np.testing.assert_array_equal(loaded["Transformer/encoder_norm/scale"], np.ones(4))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="bad.npz: not a readable .npz"):
        read_npz_shapes(tmp_path / "bad.npz")
    with pytest.raises(CheckpointError, match="bad.npz: not a readable .npz"):
        read_npz(tmp_path / "bad.npz")


def test_save_npz_writes_flat_slash_names(tmp_path):
    path = tmp_path / "tree.npz"
    save_npz(path, {"Transformer": {"encoder_norm": {"scale": np.ones(2)}}, "cls": np.zeros(1)})
    assert read_npz_shapes(path) == {"Transformer/encoder_norm/scale": (2,), "cls": (1,)}


def test_bfloat16_members_are_recovered(tmp_path):
    import ml_dtypes

    path = tmp_path / "bf16.npz"
    np.savez(path, x=np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(read_npz(path)["x"].astype(np.float32), [0, 1, 2, 3])


def test_match_parameters():
    match_parameters({"a": (1,)}, {"a": (1,)}, source="x.npz")
    with pytest.raises(CheckpointMismatchError) as info:
        match_parameters(
            {"a": (2,), "c": (3,)}, {"a": (1,), "b": (4,)}, source="x.npz", notes=("  hint",)
        )
    assert str(info.value).splitlines() == [
        "checkpoint x.npz does not match the model: 1 missing, 1 unexpected, 1 mis-shaped "
        "parameter(s)",
        "  hint",
        "  missing: b (4,)",
        "  unexpected: c (3,)",
        "  mis-shaped: a: checkpoint (2,), model (1,)",
    ]
