"""Fault injection on a finished feature store: one row per (artifact, fault).

Each row damages one file of a copy of a clean store, then checks that
- the error names the file, the fault and (for chunks) the chunk and its rows;
- the statistics step downstream fails and writes nothing;
- after the documented repair (``python -m pipeline_lib.features.verify --repair``,
  or the rebuild command when the manifest itself is lost) the store is
  byte-identical to the clean one and gives the same statistics.

Plus: a disk that fills up mid-extraction and a finalize killed at each step;
the resumed store is byte-identical.
"""

import errno
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline_lib.data import open_dataset
from pipeline_lib.features import extract, verify
from pipeline_lib.features import store as fs
from pipeline_lib.features.verify import make_recipe
from pipeline_lib.heads.stats import compute_stats, save_stats

FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FMNIST.exists(), reason="needs dataset-fashion-mnist")

N, ROWS, BATCH = 300, 64, 32  # 5 chunks; chunk 2 holds rows 128-191
SPEC = {
    "source": "fashion_mnist",
    "data_dir": str(FMNIST),
    "max_train_examples": N,
    "max_test_examples": N,
}
EXTRACTION = {"batch_size": BATCH, "chunk_rows": ROWS}


def _build(path: Path, split: str = "train", **kw) -> Path:
    recipe = make_recipe(
        dataset="fashion_mnist",
        dataset_spec=SPEC,
        split=split,
        backbone="efficientnet_lite0",
        backbone_options={},
        extraction=EXTRACTION,
    )
    extract.extract_to_store(
        open_dataset("fashion_mnist", SPEC, split),
        backbone_name="efficientnet_lite0",
        out_path=path,
        image_size=32,
        batch_size=BATCH,
        chunk_rows=ROWS,
        progress=False,
        recipe=recipe,
        **kw,
    )
    return path


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("clean") / "train.zarr")


@pytest.fixture(scope="module")
def other_run(tmp_path_factory):
    """Another run's store: same file names, other contents (the test split)."""
    return _build(tmp_path_factory.mktemp("other") / "train.zarr", split="test")


def _stats(store_path: Path, out: Path):
    """The downstream step (rule compute_stats): statistics from the store, then saved."""
    stats = compute_stats(fs.FeatureStore(store_path), l2_clip_norm=1.0, transform="clip")
    save_stats(stats, out)
    return stats


# (artifact, file in the store, fault) -> (fault named in the error, text the error names)
CHUNK = "chunk 2 (rows 128-191)"
ROWS_TABLE = [
    ("features chunk", "features/c/2/0", "delete", "missing", CHUNK),
    ("features chunk", "features/c/2/0", "truncate", "size", CHUNK),
    ("features chunk", "features/c/2/0", "flip", "checksum", CHUNK),
    ("features chunk", "features/c/2/0", "swap", "size|checksum", CHUNK),
    ("labels chunk", "labels/c/2", "delete", "missing", CHUNK),
    ("labels chunk", "labels/c/2", "truncate", "size", CHUNK),
    ("labels chunk", "labels/c/2", "flip", "checksum", CHUNK),
    ("labels chunk", "labels/c/2", "swap", "size|checksum", CHUNK),
    ("store metadata", "zarr.json", "delete", "missing", "metadata"),
    ("store metadata", "zarr.json", "truncate", "size", "metadata"),
    ("store metadata", "zarr.json", "flip", "checksum", "metadata"),
    ("store metadata", "zarr.json", "swap", "size|checksum", "metadata"),
    ("array metadata", "features/zarr.json", "flip", "checksum", "metadata"),
    ("store manifest", "manifest.json", "delete", "missing", "checksum manifest"),
    ("store manifest", "manifest.json", "truncate", "unreadable", "manifest"),
    ("store manifest", "manifest.json", "flip", "unreadable|checksum", "manifest"),
    ("store manifest", "manifest.json", "swap", "checksum|mismatch", "manifest"),
]


@pytest.mark.parametrize(
    "artifact,name,fault,named,where", ROWS_TABLE, ids=[f"{r[0]}-{r[2]}" for r in ROWS_TABLE]
)
def test_fault_is_named_blocks_downstream_and_repairs_bit_identically(
    inject_fault, tmp_path, clean, other_run, assert_same_store, artifact, name, fault, named, where
):
    store = tmp_path / "train.zarr"
    shutil.copytree(clean, store)
    inject_fault(fault, store / name, other_run / name)
    out = tmp_path / "stats.npz"

    with pytest.raises(fs.StoreError) as info:
        _stats(store, out)
    err = info.value
    msg = str(err)
    print(f"\n{artifact} x {fault}: {msg}")  # the table in the closing note
    assert isinstance(err, fs.StoreDamagedError), msg
    assert err.path == str(store / name) and str(store / name) in msg
    assert err.fault in named.split("|") and f": {err.fault}: " in msg
    assert where in msg and "It was not read as data" in msg
    assert not out.exists()  # nothing downstream written

    if artifact == "store manifest":  # nothing to check the store against: rebuild it
        assert err.repair == fs.rebuild_command(store)
        shutil.rmtree(store)
        _build(store)
    else:
        assert err.repair == fs.repair_command(store) and verify.verify_store(store)
        assert verify.main(["--repair", str(store)]) == 0

    assert verify.verify_store(store) == []
    assert_same_store(store, clean)
    got, want = _stats(store, out), _stats(clean, tmp_path / "want.npz")
    np.testing.assert_array_equal(got.xtx, want.xtx)
    np.testing.assert_array_equal(got.xty, want.xty)


def test_verify_cli_reports_without_repairing(inject_fault, tmp_path, clean, capsys):
    store = tmp_path / "train.zarr"
    shutil.copytree(clean, store)
    assert verify.main([str(store)]) == 0
    inject_fault("flip", store / "labels/c/4", None)
    assert verify.main([str(store)]) == 1
    out = capsys.readouterr().out
    assert "chunk 4 (rows 256-299)" in out and "labels/c/4: checksum" in out and "DAMAGED" in out


def test_repair_refuses_chunks_that_would_come_out_different(
    inject_fault, tmp_path, clean, monkeypatch
):
    """Never a wrong number that looks right: a re-extraction with other bytes is not used."""
    store = tmp_path / "train.zarr"
    shutil.copytree(clean, store)
    inject_fault("delete", store / "features/c/1/0", None)
    real = fs._piece_record
    monkeypatch.setattr(
        fs, "_piece_record", lambda root, key: dict(real(root, key), sha256="0" * 64)
    )
    with pytest.raises(fs.StoreError, match="chunk 1 re-extracted to other bytes"):
        verify.repair_store(store)
    assert not (store / "features/c/1/0").exists()  # nothing was changed
    assert not fs.work_dir(f"{store}.repair").exists()


def test_disk_full_mid_extraction_resumes_bit_identically(
    tmp_path, clean, monkeypatch, assert_same_store
):
    store = tmp_path / "train.zarr"
    real = fs._write_json_atomic
    calls = {"markers": 0}

    def full_disk(path, payload):
        if path.parent.name == "done":
            calls["markers"] += 1
            if calls["markers"] == 3:  # chunk 2's data is on disk, its marker is not
                path.with_name(f".{path.name}.tmp").write_text('{"chunk": 2, "ro')
                raise OSError(errno.ENOSPC, "No space left on device")
        real(path, payload)

    monkeypatch.setattr(fs, "_write_json_atomic", full_disk)
    with pytest.raises(fs.StoreError, match=r"disk is full while writing chunk 2 \(rows 128-191\)"):
        _build(store)
    assert not store.exists() and fs.pending_chunks(store) == [2, 3, 4]
    monkeypatch.setattr(fs, "_write_json_atomic", real)
    _build(store)
    assert_same_store(store, clean)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not an Exception, so nothing catches it)."""


@pytest.mark.parametrize(
    "step", ["manifest", "drop markers", "publish", "remove work dir"], ids=lambda s: s
)
def test_killed_finalize_resumes_bit_identically(
    tmp_path, clean, monkeypatch, assert_same_store, step
):
    store = tmp_path / "train.zarr"
    _build(store, finalize=False)
    real_json, real_rmtree, real_replace = fs._write_json_atomic, fs.shutil.rmtree, fs.os.replace

    def write_json(path, payload):
        if step == "manifest" and path.name == fs.MANIFEST:
            raise Killed
        real_json(path, payload)

    def rmtree(path, *a, **kw):
        if (step == "drop markers" and Path(path).name == "done") or (
            step == "remove work dir" and Path(path) == fs.work_dir(store)
        ):
            if step == "drop markers":  # killed half-way through deleting the markers
                for m in sorted(Path(path).iterdir())[:2]:
                    m.unlink()
            raise Killed
        real_rmtree(path, *a, **kw)

    def replace(src, dst):
        if step == "publish" and Path(dst) == store:
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(fs, "_write_json_atomic", write_json)
    monkeypatch.setattr(fs.shutil, "rmtree", rmtree)
    monkeypatch.setattr(fs.os, "replace", replace)
    with pytest.raises(Killed):
        extract.finalize_extraction(store)
    monkeypatch.undo()
    if step == "remove work dir":  # published whole: only an empty work dir is left
        assert not any(fs.work_dir(store).rglob("*"))
    else:
        assert not store.exists()
        assert fs.pending_chunks(store) == []  # nothing is redone
        extract.finalize_extraction(store)
    assert verify.verify_store(store) == []
    assert_same_store(store, clean)
