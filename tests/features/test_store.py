import numpy as np
import pytest

from pipeline_lib.features import store as fs

ATTRS = dict(
    backbone="toy",
    checkpoint_sha256="0" * 64,
    preprocessing="none",
    image_size=8,
    dataset="toy",
    split="train",
    num_classes=3,
)


def _make(path, n=10, d=4, rows=4):
    fs.create_store(path, num_examples=n, feature_dim=d, chunk_rows=rows, attrs=ATTRS)


def _fill(path, n=10, d=4, rows=4, skip=()):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, 3, n).astype(np.int32)
    for c in range(fs.num_chunks(n, rows)):
        if c in skip:
            continue
        a, b = fs.chunk_bounds(c, n, rows)
        fs.write_chunk(path, c, x[a:b], y[a:b])
    return x, y


def test_round_trip(tmp_path):
    path = tmp_path / "train.zarr"
    _make(path)
    assert fs.pending_chunks(path) == [0, 1, 2]
    x, y = _fill(path)
    assert fs.pending_chunks(path) == []
    assert not path.exists()  # nothing published before finalize
    fs.finalize_store(path)
    assert path.exists() and not fs.work_dir(path).exists()
    store = fs.FeatureStore(path)
    assert (store.num_examples, store.feature_dim, store.num_classes) == (10, 4, 3)
    assert store.chunk_sizes() == [4, 4, 2]
    xs, ys = store.read_all()
    np.testing.assert_array_equal(xs, x)
    np.testing.assert_array_equal(ys, y)
    assert store.attrs["complete"] is True and store.attrs["backbone"] == "toy"


def test_all_zero_chunk_is_complete_by_marker(tmp_path):
    """Zarr does not store all-fill chunks; markers, not chunk keys, prove completion."""
    path = tmp_path / "z.zarr"
    _make(path, n=4, rows=4)
    fs.write_chunk(path, 0, np.zeros((4, 4), np.float32), np.zeros(4, np.int32))
    fs.finalize_store(path)
    np.testing.assert_array_equal(fs.FeatureStore(path).read_all()[0], 0)


def test_finalize_refuses_missing_chunks(tmp_path):
    path = tmp_path / "train.zarr"
    _make(path)
    _fill(path, skip={1})
    with pytest.raises(
        fs.StoreError, match=r"1 of 3 chunks are not done \(chunks 1 \(rows 4-7\)\)"
    ):
        fs.finalize_store(path)
    assert not path.exists()
    with pytest.raises(fs.StoreError, match="unfinished extraction exists"):
        fs.FeatureStore(path)


def test_work_dir_from_other_settings_is_replaced(tmp_path):
    """No chunk of a partial store made with other settings is reusable: it is replaced."""
    path = tmp_path / "train.zarr"
    _make(path)
    _fill(path, skip={2})
    _make(path)  # same settings: resume, finished chunks kept
    assert fs.pending_chunks(path) == [2]
    with pytest.raises(fs.StoreError, match=r'backbone: "toy" in the work dir, "other" now'):
        fs.check_store(  # a shard job never replaces: only the init job may
            path, num_examples=10, feature_dim=4, chunk_rows=4, attrs=dict(ATTRS, backbone="other")
        )
    fs.create_store(
        path, num_examples=10, feature_dim=4, chunk_rows=4, attrs=dict(ATTRS, backbone="other")
    )
    assert fs.pending_chunks(path) == [0, 1, 2]  # nothing of the old store survives
    assert fs.partial_attrs(path)["backbone"] == "other"
    assert not list((fs._group_path(path) / "features").rglob("c/*/*"))


def test_nan_features_rejected_with_chunk(tmp_path):
    path = tmp_path / "train.zarr"
    _make(path)
    bad = np.ones((4, 4), np.float32)
    bad[2, 1] = np.nan
    with pytest.raises(fs.StoreError, match="chunk 1 has NaN"):
        fs.write_chunk(path, 1, bad, np.zeros(4, np.int32))
    assert fs.pending_chunks(path) == [0, 1, 2]


def test_wrong_chunk_shape(tmp_path):
    path = tmp_path / "train.zarr"
    _make(path)
    with pytest.raises(ValueError, match="chunk 2: expected features"):
        fs.write_chunk(path, 2, np.ones((4, 4), np.float32), np.zeros(4, np.int32))


def test_bad_contents_are_refused_at_finalize(tmp_path):
    import zarr

    path = tmp_path / "train.zarr"
    _make(path)
    _fill(path)
    g = zarr.open_group(str(fs._group_path(path)), mode="r+")
    g["labels"][3] = 7  # out of range for 3 classes (the marker is rewritten below)
    fs.write_chunk(path, 0, g["features"][0:4], g["labels"][0:4])
    with pytest.raises(fs.StoreError, match=r"labels out of range \[0, 3\) in rows 0..3"):
        fs.finalize_store(path)
    assert not path.exists()


def test_store_changed_behind_its_back_is_never_read(tmp_path):
    """Any write that bypasses write_chunk (here: through Zarr) fails the chunk's checksum."""
    import zarr

    path = tmp_path / "train.zarr"
    _make(path)
    _fill(path)
    fs.finalize_store(path)
    g = zarr.open_group(str(path), mode="r+")
    g["features"][9, 0] = 5.0
    store = fs.FeatureStore(path)  # same size: found when read
    store.read_chunk(0)
    with pytest.raises(fs.StoreDamagedError, match=r"chunk 2 \(rows 8-9\)") as info:
        store.read_chunk(2)
    assert info.value.fault == "checksum" and info.value.chunk == 2
    assert fs.repair_command(path) in str(info.value)


def test_missing_store(tmp_path):
    with pytest.raises(fs.StoreError, match="feature store not found"):
        fs.FeatureStore(tmp_path / "nope.zarr")


def test_chunk_damaged_before_finalize_is_redone_not_published(tmp_path):
    path = tmp_path / "train.zarr"
    _make(path)
    x, y = _fill(path)
    f = fs._group_path(path) / fs.chunk_key("features", 1)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    assert fs.pending_chunks(path) == []  # same size: only a full check sees it
    assert fs.pending_chunks(path, verify=True) == [1]
    with pytest.raises(fs.UnfinishedChunksDamagedError, match=r"chunks 1 \(rows 4-7\)"):
        fs.finalize_store(path)
    assert not path.exists() and fs.pending_chunks(path) == [1]  # its marker is gone
    fs.write_chunk(path, 1, x[4:8], y[4:8])
    fs.finalize_store(path)
    np.testing.assert_array_equal(fs.FeatureStore(path).read_all()[0], x)
