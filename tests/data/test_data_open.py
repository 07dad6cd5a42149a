"""open_dataset: dispatch on `source`, per-source options, and the schema's datasets block."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml

from pipeline_lib import experiments as xp
from pipeline_lib.data import SOURCES, ImageDataset, ImageSource, open_dataset
from pipeline_lib.data.idx import write_idx

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = Path(xp.schema_path(xp.CONFIG_SCHEMA_NAME))  # package data
CONFIG_PATH = ROOT / "config" / "config.yaml"


def _fashion_files(folder: Path, n: int = 5) -> np.ndarray:
    images = np.random.default_rng(0).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return images


def test_fashion_mnist_source_takes_the_config_key(tmp_path):
    images = _fashion_files(tmp_path)
    spec = {"source": "fashion_mnist", "data_dir": str(tmp_path), "max_test_examples": 3}
    data = open_dataset("fm_small", spec, "test")
    assert isinstance(data, ImageDataset) and isinstance(data, ImageSource)
    assert (data.name, data.split, data.num_examples, data.num_classes) == (
        "fm_small",
        "test",
        3,
        10,
    )
    np.testing.assert_array_equal(data.read(1, 3)[0], images[1:3])


def test_the_default_config_entry_still_opens(tmp_path):
    config = yaml.safe_load(CONFIG_PATH.read_text())
    spec = dict(config["datasets"]["fashion_mnist"], data_dir=str(tmp_path))
    _fashion_files(tmp_path)
    assert open_dataset("fashion_mnist", spec, "test").num_examples == 5


def test_unknown_source():
    with pytest.raises(ValueError) as info:
        open_dataset("mine", {"source": "hdf5"}, "train")
    assert str(info.value) == (
        "datasets.mine.source='hdf5': unknown source; "
        "choose one of fashion_mnist, tfds, image_folder"
    )
    with pytest.raises(ValueError, match=r"datasets.mine.source=None: unknown source"):
        open_dataset("mine", {"data_dir": "/x"}, "train")
    with pytest.raises(TypeError, match=r"datasets.mine: must be a mapping"):
        open_dataset("mine", ["tfds"], "train")


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        (
            {"source": "fashion_mnist", "tfds_name": "x", "path": "/p"},
            r"datasets.k.path, datasets.k.tfds_name: not an option of source 'fashion_mnist'",
        ),
        ({"source": "tfds", "extensions": ["png"]}, r"datasets.k.extensions: not an option"),
        ({"source": "image_folder", "path": "/p", "allow_network": True}, r"allow_network"),
    ],
)
def test_options_of_another_source_are_rejected(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        open_dataset("k", spec, "train")


@pytest.mark.parametrize("source", ["fashion_mnist", "tfds", "image_folder"])
def test_unknown_split(source, tmp_path):
    spec = (
        {"source": source, "path": str(tmp_path)}
        if source == "image_folder"
        else {"source": source}
    )
    with pytest.raises(ValueError, match=r"unknown split 'validation'"):
        open_dataset("k", spec, "validation")


@pytest.mark.parametrize(
    ("spec", "error", "pattern"),
    [
        ({"allow_network": "yes"}, TypeError, r"datasets.k.allow_network: must be true or false"),
        ({"max_train_examples": 2.5}, TypeError, r"datasets.k.max_train_examples: must be an int"),
        ({"max_train_examples": True}, TypeError, r"max_train_examples: must be an integer"),
        ({"max_train_examples": 0}, ValueError, r"datasets.k.max_train_examples: must be >= 1"),
        ({"data_dir": 3}, TypeError, r"datasets.k.data_dir: must be a non-empty string"),
    ],
)
def test_bad_option_values_name_the_option(spec, error, pattern):
    with pytest.raises(error, match=pattern):
        open_dataset("k", {"source": "fashion_mnist", **spec}, "train")


# --- the schema's datasets block ------------------------------------------------------------


@pytest.fixture(scope="module")
def schema():
    return yaml.safe_load(SCHEMA_PATH.read_text())


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CONFIG_PATH.read_text())


def _validate(schema, config, datasets):
    config = copy.deepcopy(config)
    config["datasets"] = datasets
    jsonschema.Draft202012Validator(schema).validate(config)
    return config


def _all_properties(node):
    """Yield (name, subschema) for every property declared anywhere below node."""
    if isinstance(node, dict):
        yield from node.get("properties", {}).items()
        for value in node.values():
            yield from _all_properties(value)
    elif isinstance(node, list):
        for value in node:
            yield from _all_properties(value)


def test_every_dataset_option_is_described_and_has_no_default(schema):
    block = schema["properties"]["datasets"]["additionalProperties"]
    assert block["additionalProperties"] is False
    assert block["properties"]["source"]["enum"] == list(SOURCES)
    for name, sub in _all_properties(block["properties"]):
        assert sub.get("description"), f"datasets option {name} has no description"
        # Snakemake's validate() fills schema defaults into every entry, whatever its source.
        assert "default" not in sub, f"datasets option {name} has a schema default"
    declared = set(block["properties"])
    for source, (_, keys) in SOURCES.items():
        assert set(keys) <= declared, f"source {source}: options missing from the schema"


def test_schema_source_options_match_the_library(schema):
    rules = schema["properties"]["datasets"]["additionalProperties"]["allOf"]
    by_source = {
        rule["if"]["properties"]["source"]["const"]: set(rule["then"]["propertyNames"]["enum"])
        for rule in rules
    }
    assert by_source == {source: set(keys) for source, (_, keys) in SOURCES.items()}


def test_schema_accepts_the_documented_entries(schema, config):
    _validate(
        schema,
        config,
        {
            "fashion_mnist": config["datasets"]["fashion_mnist"],
            "cifar10": {"source": "tfds", "data_dir": "/shared/tfds", "allow_network": False},
            "imagenet": {
                "source": "tfds",
                "tfds_name": "imagenet2012",
                "splits": {"train": "train", "test": "validation"},
                "max_train_examples": 100000,
            },
            "flowers": {
                "source": "image_folder",
                "path": "/data/flowers",
                "splits": {"test": "val"},
                "extensions": ["jpg", "png"],
            },
        },
    )


@pytest.mark.parametrize(
    "entry",
    [
        {"source": "hdf5"},
        {"path": "/p"},
        {"source": "image_folder"},
        {"source": "image_folder", "path": "/p", "data_dir": "/d"},
        {"source": "tfds", "path": "/p"},
        {"source": "fashion_mnist", "splits": {"test": "t10k"}},
        {"source": "tfds", "splits": {"validation": "validation"}},
        {"source": "tfds", "extra": 1},
        {"source": "image_folder", "path": "/p", "extensions": []},
        {"source": "tfds", "max_test_examples": 0},
    ],
)
def test_schema_rejects_bad_entries(schema, config, entry):
    with pytest.raises(jsonschema.ValidationError):
        _validate(schema, config, {"bad": entry})


def test_snakemake_validation_adds_no_keys(config):
    snakemake_utils = pytest.importorskip("snakemake.utils")
    datasets = {
        "flowers": {"source": "image_folder", "path": "/data/flowers"},
        "cifar10": {"source": "tfds"},
    }
    config = copy.deepcopy(config)
    config["datasets"] = copy.deepcopy(datasets)
    snakemake_utils.validate(config, str(SCHEMA_PATH))
    assert config["datasets"] == datasets
