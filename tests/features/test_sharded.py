"""Sharded extraction: S shards give the unsharded bytes, concurrently too; init and
finalize refuse what they must."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline_lib.features import extract
from pipeline_lib.features import store as fs

ROWS, BATCH = 32, 16  # 300 rows -> 10 chunks, the last one of 12 rows
SETTINGS = extract.ExtractionSettings(batch_size=BATCH, chunk_rows=ROWS)
COMMON = dict(backbone_name="efficientnet_lite0", image_size=32, settings=SETTINGS)


@given(num_chunks=st.integers(0, 200), num_shards=st.integers(1, 70))
def test_shards_partition_chunks_in_contiguous_order(num_chunks, num_shards):
    ranges = [fs.shard_chunks(num_chunks, num_shards, k) for k in range(num_shards)]
    assert [c for r in ranges for c in r] == list(range(num_chunks))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1  # balanced


def test_shard_index_checked():
    with pytest.raises(ValueError, match="shard 3 of 3"):
        fs.shard_chunks(10, 3, 3)


def _extract_unsharded(source, path) -> dict:
    """Lite0 at 32 px in one process, as every store here is compared against."""
    return extract.extract_to_store(
        source,
        backbone_name="efficientnet_lite0",
        out_path=path,
        image_size=32,
        batch_size=BATCH,
        chunk_rows=ROWS,
        progress=False,
    )


@pytest.fixture(scope="module")
def unsharded(fmnist_300, tmp_path_factory):
    path = tmp_path_factory.mktemp("unsharded") / "train.zarr"
    stats = _extract_unsharded(fmnist_300, path)
    assert stats["chunks_done"] == 10
    return path


def test_three_shards_in_any_order_equal_unsharded(
    fmnist_300, unsharded, tmp_path, assert_same_store
):
    path = tmp_path / "train.zarr"
    attrs = extract.init_store(fmnist_300, out_path=path, **COMMON)
    assert (attrs["num_examples"], attrs["num_chunks"]) == (300, 10)
    results = {}
    for k in (2, 0, 1):
        results[k] = extract.extract_shard(
            fmnist_300, out_path=path, shard=k, num_shards=3, **COMMON
        )
    assert [results[k]["chunk_range"] for k in range(3)] == [[0, 3], [3, 6], [6, 10]]
    assert [results[k]["images"] for k in range(3)] == [96, 96, 108]
    assert not path.exists()  # shards never publish
    again = extract.extract_shard(fmnist_300, out_path=path, shard=1, num_shards=3, **COMMON)
    assert again["chunks_done"] == 0 and again["chunks_already_done"] == 3  # a rerun skips
    stats = extract.finalize_extraction(path, results.values())
    assert_same_store(path, unsharded)
    assert stats["num_shards"] == 3 and stats["images_extracted"] == 300
    store = fs.FeatureStore(path)
    recorded = store.attrs["extraction_stats"]
    assert [s["shard"] for s in recorded["shards"]] == [0, 1, 2]
    for s in recorded["shards"]:
        assert s["images_per_second"] > 0 and s["flops_per_image"] > 1e6  # Lite0 at 32 px
        assert s["num_devices"] >= 1 and s["platform"] == "cpu"


CONCURRENT = textwrap.dedent(
    """
    import sys
    from pipeline_lib.data import load_dataset
    from pipeline_lib.features import extract
    data = load_dataset("fashion_mnist", "train", max_examples=300)
    settings = extract.ExtractionSettings(batch_size={batch}, chunk_rows={rows})
    extract.extract_shard(data, backbone_name="efficientnet_lite0", image_size=32,
                          settings=settings, out_path=sys.argv[1],
                          shard=int(sys.argv[2]), num_shards=int(sys.argv[3]))
    """
).format(batch=BATCH, rows=ROWS)


@pytest.mark.slow
def test_concurrent_shard_processes(fmnist_300, unsharded, tmp_path, assert_same_store):
    path = tmp_path / "train.zarr"
    extract.init_store(fmnist_300, out_path=path, **COMMON)
    meta = {p: p.read_bytes() for p in fs.work_dir(path).rglob("zarr.json")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, str(path), str(k), "4"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    # Shards wrote chunks and markers only: metadata is byte-for-byte what init wrote.
    assert {p: p.read_bytes() for p in fs.work_dir(path).rglob("zarr.json")} == meta
    assert fs.pending_chunks(path) == []
    extract.finalize_extraction(path)
    assert_same_store(path, unsharded)


def test_init_replaces_a_work_dir_made_with_other_settings(
    fmnist_300, tmp_path, monkeypatch, caplog
):
    path = tmp_path / "train.zarr"
    extract.init_store(fmnist_300, out_path=path, **COMMON)
    extract.init_store(fmnist_300, out_path=path, **COMMON)  # same settings: fine (resume)
    other_rows = dict(COMMON, settings=extract.ExtractionSettings(batch_size=BATCH, chunk_rows=64))
    with pytest.raises(fs.StoreError, match="chunk_rows: 32 in the work dir, 64 now") as info:
        extract.extract_shard(fmnist_300, out_path=path, **other_rows)  # shards never replace
    assert str(fs.work_dir(path)) in str(info.value)
    extract.init_store(fmnist_300, out_path=path, **other_rows)
    assert "chunk_rows: 32 in the work dir, 64 now" in caplog.text
    assert fs.partial_attrs(path)["chunk_rows"] == 64
    extract.init_store(fmnist_300, out_path=path, **COMMON)  # and back
    fewer = type(fmnist_300)(
        images=fmnist_300.images[:200],
        labels=fmnist_300.labels[:200],
        num_classes=10,
        name=fmnist_300.name,
        split="train",
        source=fmnist_300.source,
    )
    with pytest.raises(fs.StoreError, match="num_examples: 300 in the work dir, 200 now"):
        extract.extract_shard(fewer, out_path=path, **COMMON)
    real_load = extract._load

    def other_checkpoint(*args):
        backbone, variables, _ = real_load(*args)
        return backbone, variables, "f" * 64

    monkeypatch.setattr(extract, "_load", other_checkpoint)
    with pytest.raises(fs.StoreError, match="checkpoint_sha256"):  # shards check it too
        extract.extract_shard(fmnist_300, out_path=path, **COMMON)
    assert fs.pending_chunks(path) == list(range(10))  # nothing was written


def test_shard_needs_init(fmnist_300, tmp_path):
    with pytest.raises(fs.StoreError, match="no partial store.*init_store"):
        extract.extract_shard(fmnist_300, out_path=tmp_path / "train.zarr", **COMMON)


def test_finalize_refuses_an_incomplete_store_naming_missing_chunks(fmnist_300, tmp_path):
    path = tmp_path / "train.zarr"
    extract.init_store(fmnist_300, out_path=path, **COMMON)
    extract.extract_shard(fmnist_300, out_path=path, shard=1, num_shards=3, **COMMON)
    with pytest.raises(fs.StoreError) as info:
        extract.finalize_extraction(path)
    msg = str(info.value)
    assert "7 of 10 chunks are not done" in msg
    assert "chunks 0-2 (rows 0-95), 6-9 (rows 192-299)" in msg
    assert not path.exists() and fs.work_dir(path).exists()


def test_variable_size_source_gives_a_valid_store(tmp_path, variable_size_source):
    src = variable_size_source(40)
    path = tmp_path / "train.zarr"
    stats = extract.extract_to_store(
        src,
        backbone_name="efficientnet_lite0",
        out_path=path,
        image_size=32,
        batch_size=16,
        chunk_rows=24,
        progress=False,
        decode_threads=2,
        prefetch_batches=3,
    )
    assert stats["host_resize"] is True and stats["images"] == 40
    store = fs.FeatureStore(path)
    x, y = store.read_all()
    assert x.shape == (40, 1280) and np.isfinite(x).all() and y.tolist() == src.labels.tolist()
    assert store.attrs["preprocessing"].startswith("resize on the host to 32px (efficientnet_lite")
    assert store.attrs["matmul_precision"] == "highest"


def test_settings_are_validated():
    with pytest.raises(ValueError, match="extraction.batch_size=0"):
        extract.ExtractionSettings(batch_size=0)
    with pytest.raises(ValueError, match="extraction.dtype='float16'"):
        extract.ExtractionSettings(dtype="float16")
    s = extract.ExtractionSettings.from_config({"batch_size": 8, "shards": 4, "dtype": "bfloat16"})
    assert (s.batch_size, s.dtype, s.chunk_rows) == (8, "bfloat16", 1024)


def test_bfloat16_compute_is_stored_as_float32(fmnist_300, unsharded, tmp_path):
    small = type(fmnist_300)(
        images=fmnist_300.images[:64],
        labels=fmnist_300.labels[:64],
        num_classes=10,
        name=fmnist_300.name,
        split="train",
        source=fmnist_300.source,
    )
    path = tmp_path / "bf16.zarr"
    extract.extract_to_store(
        small,
        backbone_name="efficientnet_lite0",
        out_path=path,
        image_size=32,
        batch_size=BATCH,
        chunk_rows=ROWS,
        dtype="bfloat16",
        progress=False,
    )
    store = fs.FeatureStore(path)
    x, _ = store.read_all()
    ref = fs.FeatureStore(unsharded).read_all()[0][:64]
    assert x.dtype == np.float32 and store.attrs["compute_dtype"] == "bfloat16"
    assert not np.array_equal(x, ref)  # bf16 really was used...
    cos = (x * ref).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.95 and np.median(cos) > 0.99  # ...and gives nearly the same features


def test_more_shards_than_chunks_leaves_some_empty(fmnist_300, tmp_path):
    path = tmp_path / "train.zarr"
    extract.init_store(fmnist_300, out_path=path, **COMMON)
    empty = extract.extract_shard(fmnist_300, out_path=path, shard=0, num_shards=20, **COMMON)
    assert empty["chunk_range"] == [] and empty["images"] == 0 and empty["chunks_done"] == 0
    assert fs.pending_chunks(path) == list(range(10))


def _backend_compiles(fn):
    """(fn's result, how many XLA programs were compiled while it ran)."""
    import jax.monitoring

    count = [0]

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        return fn(), count[0]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_a_second_extraction_reuses_the_compiled_program(
    fmnist_300, unsharded, tmp_path, assert_same_store
):
    """The process keeps its compiled forward passes (extract._COMPILED): extracting the same
    backbone at the same batch shape again compiles nothing and gives the same bytes."""
    path = tmp_path / "again.zarr"
    stats, compiles = _backend_compiles(lambda: _extract_unsharded(fmnist_300, path))
    assert stats["chunks_done"] == 10
    assert compiles == 0
    assert_same_store(unsharded, path)


def test_program_key_tells_every_program_apart():
    """Anything that changes the compiled program changes the key; a fresh but identical
    backbone object does not (the key holds no object ids)."""
    import jax
    import jax.numpy as jnp

    from pipeline_lib.backbones import get_backbone

    mesh = extract.dev.data_parallel_mesh(1)
    x = jnp.zeros((BATCH, 28, 28, 1), jnp.uint8)

    def key(name="efficientnet_lite0", size=32, host=False, batch=x, **kw):
        backbone = get_backbone(name, **kw)
        variables = jax.eval_shape(lambda: backbone.load_variables(size)[0])
        return extract._program_key(backbone, variables, batch, size, host, mesh)

    base = key()
    assert key() == base
    variants = [
        key(size=64),
        key(host=True),
        key(batch=jnp.zeros((2 * BATCH, 28, 28, 1), jnp.uint8)),
        key(dtype="bfloat16"),
        key(depthwise_impl="shift"),
        key(spec={"model": "efficientnet_lite", "variant": "lite0", "tta": "flip"}),
        key(name="efficientnet_lite1"),
        key(name="scatternet", size=28),
    ]
    assert all(v != base for v in variants)
    assert len(set(variants)) == len(variants)
