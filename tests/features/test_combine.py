"""Feature combinations: derived stores that concatenate stores row by row."""

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline_lib import experiments as xp
from pipeline_lib.features import combine
from pipeline_lib.features import store as fs
from pipeline_lib.features.verify import repair_store, verify_store


def _store(path: Path, feats: np.ndarray, labels: np.ndarray, *, chunk_rows=8, **attrs) -> Path:
    base = dict(
        backbone=attrs.pop("backbone", "toy"),
        checkpoint_sha256="0" * 64,
        preprocessing="none",
        image_size=attrs.pop("image_size", 32),
        dataset="toy",
        split=attrs.pop("split", "train"),
        num_classes=3,
        class_names=["a", "b", "c"],
        **attrs,
    )
    n, d = feats.shape
    fs.create_store(path, num_examples=n, feature_dim=d, chunk_rows=chunk_rows, attrs=base)
    for c in range(fs.num_chunks(n, chunk_rows)):
        a, b = fs.chunk_bounds(c, n, chunk_rows)
        fs.write_chunk(path, c, feats[a:b], labels[a:b])
    fs.finalize_store(path)
    return path


@pytest.fixture
def sources(tmp_path):
    rng = np.random.default_rng(0)
    labels = (np.arange(21) % 3).astype(np.int32)
    a = rng.normal(size=(21, 4)).astype(np.float32) * 10
    b = rng.normal(size=(21, 3)).astype(np.float32)
    pa = _store(tmp_path / "a.zarr", a, labels, backbone="big", chunk_rows=8)
    pb = _store(tmp_path / "b.zarr", b, labels, backbone="small", chunk_rows=5, tta="flip")
    return [("big@32px", pa), ("small@28px", pb)], a, b, labels


def test_rows_are_the_concatenation_and_the_store_is_verified(tmp_path, sources):
    srcs, a, b, labels = sources
    out = tmp_path / "ab.zarr"
    combine.combine_stores(out, srcs, name="ab", image_size=32, chunk_rows=6)
    st = fs.FeatureStore(out)  # manifest and checksums checked on open and read
    feats, got_labels = st.read_all()
    np.testing.assert_array_equal(feats, np.concatenate([a, b], axis=1))
    np.testing.assert_array_equal(got_labels, labels)
    assert st.attrs["backbone"] == "ab" and st.attrs["source_normalization"] == "none"
    recorded = st.attrs["sources"]
    assert [r["backbone"] for r in recorded] == ["big", "small"]
    assert recorded[1]["tta"] == "flip" and "tta" not in recorded[0]
    for r, (_, path) in zip(recorded, srcs, strict=True):
        assert r["manifest_sha256"] == fs.FeatureStore(path).manifest["manifest_sha256"]
    recipe = st.manifest["recipe"]["combine"]
    assert [s["store"] for s in recipe["sources"]] == [str(p) for _, p in srcs]
    assert verify_store(out) == []


def test_l2_scales_each_source_to_unit_norm(tmp_path, sources):
    srcs, a, b, _ = sources
    out = tmp_path / "ab.zarr"
    combine.combine_stores(out, srcs, name="ab", image_size=32, source_normalization="l2")
    feats, _ = fs.FeatureStore(out).read_all()
    np.testing.assert_allclose(np.linalg.norm(feats[:, :4], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(feats[:, 4:], axis=1), 1.0, rtol=1e-6)
    # a fixed per-example map: each row is its own source rows, rescaled
    np.testing.assert_allclose(feats[:, 4:], b / np.linalg.norm(b, axis=1, keepdims=True),
                               rtol=1e-6)  # fmt: skip


def test_misaligned_sources_are_refused_naming_the_stores(tmp_path, sources):
    srcs, a, b, labels = sources
    fewer = _store(tmp_path / "fewer.zarr", b[:20], labels[:20])
    with pytest.raises(combine.CombineError, match=r"a\.zarr.*fewer\.zarr.*num_examples is 21"):
        combine.combine_stores(tmp_path / "x.zarr", [srcs[0], ("f", fewer)], name="x",
                               image_size=32)  # fmt: skip
    shuffled = _store(tmp_path / "shuf.zarr", b, np.roll(labels, 1))
    with pytest.raises(combine.CombineError, match=r"shuf\.zarr \(s\): row 0 has label 0 in"):
        combine.combine_stores(tmp_path / "y.zarr", [srcs[0], ("s", shuffled)], name="y",
                               image_size=32)  # fmt: skip
    test_split = _store(tmp_path / "test.zarr", b, labels, split="test")
    with pytest.raises(combine.CombineError, match="split is 'train' in the first and 'test'"):
        combine.combine_stores(tmp_path / "z.zarr", [srcs[0], ("t", test_split)], name="z",
                               image_size=32)  # fmt: skip
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()


def test_resumed_combination_is_bit_identical(tmp_path, sources, assert_same_store):
    srcs, *_ = sources
    one = tmp_path / "one.zarr"
    combine.combine_stores(one, srcs, name="ab", image_size=32, chunk_rows=6)
    two = tmp_path / "two.zarr"
    first = combine.combine_stores(two, srcs, name="ab", image_size=32, chunk_rows=6,
                                   chunks=[0, 2], finalize=False)  # fmt: skip
    assert first["chunks_done"] == 2 and not two.exists()  # a killed job: nothing published
    rest = combine.combine_stores(two, srcs, name="ab", image_size=32, chunk_rows=6)
    assert (rest["chunks_done"], rest["chunks_already_done"]) == (2, 2)
    assert_same_store(one, two)


def test_damaged_chunk_is_recomputed_from_the_sources(tmp_path, sources, assert_same_store):
    srcs, *_ = sources
    out, ref = tmp_path / "ab.zarr", tmp_path / "ref.zarr"
    for p in (out, ref):
        combine.combine_stores(p, srcs, name="ab", image_size=32, chunk_rows=6)
    chunk = out / "features" / "c" / "1" / "0"
    chunk.write_bytes(b"garbage")
    assert verify_store(out)
    done = repair_store(out)
    assert done["chunks"] == [1] and verify_store(out) == []
    assert_same_store(out, ref)
    # a source that changed since cannot give the same bytes: refused, nothing written
    _store(srcs[1][1], np.ones((21, 3), np.float32), sources[3], chunk_rows=5)
    chunk.write_bytes(b"garbage")
    with pytest.raises(fs.StoreError, match=r"b\.zarr \(small@28px\) has changed"):
        repair_store(out)


# ----------------------------------------------------------------------------- config


def _config(**backbones):
    return {"results_dir": "results", "backbones": backbones}


COMBO = {
    "model": "combine",
    "sources": [{"backbone": "efficientnet_lite0"}, {"backbone": "scatternet", "image_size": 28}],
    "source_normalization": "l2",
}


def test_combination_paths_and_settings():
    config = _config(lite0_scatter=COMBO, flip={"model": "efficientnet_lite", "variant": "lite0",
                                                "tta": "flip"})  # fmt: skip
    assert xp.combined_backbones(config) == ["lite0_scatter"]
    assert xp.combination_source_paths(config, "fm", "lite0_scatter", 128, "train") == [
        "results/features/fm/efficientnet_lite0/128px/train.zarr",
        "results/features/fm/scatternet/28px/train.zarr",
    ]
    settings = xp.combination_settings(config, "fm", "lite0_scatter", "128")
    assert settings["source_normalization"] == "l2"
    assert [s["image_size"] for s in settings["sources"]] == [128, 28]


def test_the_two_store_rules_never_claim_the_same_backbone():
    import re

    config = _config(lite0_scatter=COMBO, flip={"model": "efficientnet_lite", "variant": "lite0"})
    comb = re.compile(xp.backbone_wildcard(config, combined=True))
    extr = re.compile(xp.backbone_wildcard(config, combined=False))
    for name in ("lite0_scatter", "flip", "efficientnet_lite0", "lite0_scatter2", "lite0"):
        assert bool(comb.fullmatch(name)) != bool(extr.fullmatch(name)), name
    assert comb.fullmatch("lite0_scatter") and not comb.fullmatch("lite0_scatter2")
    # in a path, as Snakemake matches it: the name is followed by '/'
    in_path = re.compile(f"(?P<b>{extr.pattern})/(?P<s>\\d+)px")
    assert not in_path.fullmatch("lite0_scatter/128px") and in_path.fullmatch("flip/128px")
    none = _config()
    assert not re.fullmatch(xp.backbone_wildcard(none, combined=True), "efficientnet_lite0")


L0 = {"backbone": "efficientnet_lite0"}


@pytest.mark.parametrize(
    ("sources", "match"),
    [
        ([L0], "at least two"),
        ([L0, {"backbone": "nope"}], r"sources\[1\]\.backbone 'nope' is unknown"),
        ([L0, {"backbone": "other"}], "itself a combination"),
        ([L0, L0], "same store twice"),
        ([L0, {"backbone": "scatternet", "size": 28}], r"sources\[1\]"),
    ],
)
def test_bad_combinations_are_config_errors(sources, match):
    config = _config(mine={"model": "combine", "sources": sources}, other=COMBO)
    with pytest.raises(xp.ConfigError, match=match):
        xp.combination_spec(config, "mine")


def test_schema_accepts_combinations_and_tta_and_rejects_mixtures():
    base = xp.load_yaml(Path(xp.__file__).resolve().parents[1] / "config" / "config.yaml")
    ok = dict(base, backbones={"c": COMBO, "f": {"model": "efficientnet_lite", "variant": "lite1",
                                                 "tta": "flip"}})  # fmt: skip
    xp.validate_config(ok)
    for bad in (
        dict(COMBO, variant="lite0"),
        dict(COMBO, tta="flip"),
        {"model": "efficientnet_lite", "variant": "lite0", "sources": COMBO["sources"]},
        {"model": "efficientnet_lite", "variant": "lite0", "tta": "mirror"},
        {"model": "combine"},
    ):
        with pytest.raises(xp.ConfigError, match="backbones"):
            xp.validate_config(dict(base, backbones={"b": bad}))


def test_combined_attrs_name_every_source(tmp_path, sources):
    srcs, *_ = sources
    opened = [(label, fs.FeatureStore(p)) for label, p in srcs]
    attrs = combine.combined_attrs("ab", opened, image_size=32, source_normalization="l2")
    assert "[0] big@32px: big at 32px, d=4" in attrs["preprocessing"]
    assert "[1] small@28px: small at 32px, d=3, tta: flip" in attrs["preprocessing"]
    json.dumps(attrs)  # JSON-able: it becomes the store's attributes
