"""Test-time augmentation averaging at extraction (backbones.<name>.tta: flip)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline_lib.backbones import get_backbone
from pipeline_lib.features import extract
from pipeline_lib.features import store as fstore

from .conftest import TINY

FLIP_SPEC = {"model": "efficientnet_lite", "variant": "lite0", "tta": "flip"}


def _features(backbone, images, image_size=32):
    variables, _ = backbone.load_variables(image_size)
    fn = jax.jit(extract.make_feature_fn(backbone, image_size))
    return np.asarray(fn(variables, jnp.asarray(images)))


@pytest.fixture(scope="module")
def images(fmnist_300):
    return fmnist_300.read(0, 8)[0]


def test_flip_is_the_mean_over_the_image_and_its_mirror(images):
    plain = get_backbone("efficientnet_lite0")
    flip = get_backbone("lite0_flip", spec=FLIP_SPEC)
    assert (plain.tta, flip.tta) == ("none", "flip")
    f, f_mirror = _features(plain, images), _features(plain, images[:, :, ::-1])
    got = _features(flip, images)
    np.testing.assert_allclose(got, 0.5 * (f + f_mirror), rtol=1e-5, atol=1e-5)
    assert np.abs(f - f_mirror).max() > 1e-2  # the mirror really is another input


def test_flip_rows_depend_on_their_own_image_only(images):
    """One vector per example from that example alone: the heads' sensitivity analysis holds."""
    flip = get_backbone("lite0_flip", spec=FLIP_SPEC)
    whole = _features(flip, images)
    other = images.copy()
    other[1:] = 255 - other[1:]  # change every other row of the batch
    np.testing.assert_allclose(_features(flip, other)[0], whole[0], rtol=1e-5, atol=1e-6)


def test_flip_of_a_mirror_symmetric_image_changes_nothing(images):
    symmetric = np.concatenate([images[:, :, :14], images[:, :, :14][:, :, ::-1]], axis=2)
    plain = get_backbone("efficientnet_lite0")
    flip = get_backbone("lite0_flip", spec=FLIP_SPEC)
    np.testing.assert_allclose(
        _features(flip, symmetric), _features(plain, symmetric), rtol=1e-5, atol=1e-5
    )


def test_unknown_tta_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"backbones\.mine\.tta is 'rotate'.*'none', 'flip'"):
        get_backbone("mine", spec={**FLIP_SPEC, "tta": "rotate"})


def _extract(source, path, backbone_options):
    return extract.extract_to_store(
        source,
        out_path=path,
        chunk_rows=64,
        batch_size=32,
        progress=False,
        backbone_options=backbone_options,
        **TINY,
    )


def test_tta_is_recorded_in_the_store_and_stores_never_mix(tmp_path, fmnist_300):
    from pipeline_lib.data import ImageDataset

    src = ImageDataset(
        fmnist_300.images[:96], fmnist_300.labels[:96], fmnist_300.num_classes,
        "fashion_mnist", "train", "test",
    )  # fmt: skip
    plain, flip = tmp_path / "plain.zarr", tmp_path / "flip.zarr"
    _extract(src, plain, None)
    _extract(src, flip, {"spec": FLIP_SPEC})
    a, b = fstore.FeatureStore(plain), fstore.FeatureStore(flip)
    assert "tta" not in a.attrs  # stores made without TTA keep their attributes
    assert b.attrs["tta"] == "flip" and "tta: flip" in b.attrs["preprocessing"]
    assert not np.allclose(a.read_all()[0], b.read_all()[0])
    np.testing.assert_array_equal(a.read_all()[1], b.read_all()[1])

    # A partial store made without TTA is refused by a shard job with TTA ...
    part = tmp_path / "part.zarr"
    settings = extract.ExtractionSettings(chunk_rows=64, batch_size=32)
    extract.init_store(src, out_path=part, settings=settings, **TINY)
    with pytest.raises(fstore.StoreError, match="tta"):
        extract.extract_shard(
            src, out_path=part, settings=settings, backbone_options={"spec": FLIP_SPEC}, **TINY
        )
    # ... and replaced (not resumed) by an init job with TTA.
    attrs = extract.init_store(
        src, out_path=part, settings=settings, backbone_options={"spec": FLIP_SPEC}, **TINY
    )
    assert attrs["tta"] == "flip"
