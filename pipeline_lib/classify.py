"""Classify images with a released head: ``python -m pipeline_lib.classify``.

::

    python -m pipeline_lib.classify --head .../head.npz --images photos/ --out preds.csv
    python -m pipeline_lib.classify --head .../head.npz --dataset fashion_mnist --out preds.csv

The head file records how its training features were made (backbone, checkpoint
sha256, image size, preprocessing including the resize, compute dtype and batch
shape; see :mod:`pipeline_lib.heads.released`). New images go through exactly that
extraction code (:func:`pipeline_lib.features.extract.extract_to_store`, into a
temporary store), so a dataset split classified here gets the same features, and
the same labels, as in the run's metrics.json. A backbone whose checkpoint does not
have the recorded sha256 is refused before any image is read.

Images: files and folders (searched recursively; hidden files and other extensions
skipped), or a dataset key of the config (``--dataset``, with ``--split``). When an
image's folder is named after a class (its name or its index), or the images come
from a dataset, the true labels are known and the accuracy is printed too.

The CSV has one row per image: ``file`` (path, or ``<dataset>/<split>/<row>``),
``label_name``, ``label_index`` and ``score``, the head's output for that class
(higher is more confident; not a calibrated probability).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline_lib.heads.released import ReleasedHead, load_head

__all__ = ["ClassifyError", "FileImages", "classify", "main"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff")


class ClassifyError(ValueError):
    """The head, the images or the backbone do not fit together; the message says why."""


def _decode(path: str) -> np.ndarray:
    """uint8 (H, W) for grey images (as the IDX and TFDS sources give them), else (H, W, 3)."""
    from PIL import Image

    from pipeline_lib.data.image_folder import decode_image_file

    with Image.open(path) as image:
        if image.mode == "L":
            return np.asarray(image, dtype=np.uint8)
    return decode_image_file(path)


class FileImages:
    """Image files as an ImageSource. With ``same_shape``, every image has one shape, so the
    extractor resizes on the device, as it does for fixed-shape datasets."""

    split = "new"

    def __init__(self, files: Sequence[str], labels: np.ndarray, num_classes: int, shape=None):
        self.name, self.source = "classify", f"{len(files)} image files"
        self.files, self.labels, self.num_classes = list(files), labels, num_classes
        if shape is not None:
            self.image_shape = tuple(shape)

    @property
    def num_examples(self) -> int:
        return len(self.files)

    def read(self, start: int, stop: int):
        images = [_decode(f) for f in self.files[start:stop]]
        if hasattr(self, "image_shape"):
            return np.stack(images), self.labels[start:stop]
        return images, self.labels[start:stop]


def find_images(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Image files named, or found (recursively, sorted) in the folders named."""
    files: list[str] = []
    for given in paths:
        path = Path(given)
        if path.is_file():
            files.append(str(path))
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise ClassifyError(
                    f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder"
                )
            files.extend(str(p) for p in found)
        else:
            raise ClassifyError(f"{path}: no such file or folder")
    return files


def _folder_labels(files: Sequence[str], class_names: Sequence[str]) -> np.ndarray | None:
    """Labels from the images' folder names (a class name or index), if every one has one."""
    index = {name: i for i, name in enumerate(class_names)}
    index.update({str(i): i for i in range(len(class_names))})
    labels = [index.get(Path(f).parent.name) for f in files]
    if any(label is None for label in labels):
        return None
    return np.asarray(labels, np.int32)


def _image_shapes(files: Sequence[str]) -> set[tuple]:
    from PIL import Image

    shapes = set()
    for f in files:
        with Image.open(f) as image:
            shapes.add((image.size, image.mode == "L"))
    return shapes


def _file_source(files: Sequence[str], head: ReleasedHead) -> tuple[FileImages, bool]:
    """The files as a source resized like the head's training images; whether exactly so."""
    num_classes = head.weights.shape[1]
    truth = _folder_labels(files, head.class_names)
    labels = truth if truth is not None else np.zeros(len(files), np.int32)
    on_host = head.metadata["features"].get("preprocessing", "").startswith("Pillow")
    shapes = _image_shapes(files)
    if on_host:
        return FileImages(files, labels, num_classes), truth is not None
    if len(shapes) == 1:  # one shape: resized on the device like the training data
        ((w, h), grey) = next(iter(shapes))
        shape = (h, w) if grey else (h, w, 3)
        return FileImages(files, labels, num_classes, shape), truth is not None
    print(
        "classify: WARNING: the head's training images were resized on the device (one shape "
        f"for all), but these images have {len(shapes)} shapes; they are resized on the host "
        "instead, so features can differ slightly from training",
        file=sys.stderr,
    )
    return FileImages(files, labels, num_classes), truth is not None


def checkpoint_sha256(name: str, backbone_options: dict) -> str:
    """sha256 of the checkpoint file that backbone ``name`` would load, without loading it."""
    from pipeline_lib.backbones import checkpoint_path, handcrafted_sha256
    from pipeline_lib.backbones.checkpoints import fetch_checkpoint, sha256_file

    spec = backbone_options.get("spec")
    if spec is not None and spec.get("model") == "vit":
        _, sha256 = fetch_checkpoint(
            str(spec["checkpoint"]),
            cache_dir=backbone_options.get("cache_dir"),
            sha256=spec.get("sha256"),
            allow_network=bool(spec.get("allow_network", False)),
            config_key=f"backbones.{name}.allow_network",
        )
        return sha256
    builtin = name if spec is None else f"efficientnet_{spec.get('variant')}"
    if (descriptor_sha256 := handcrafted_sha256(builtin)) is not None:
        return descriptor_sha256  # no weights: the sha256 of the transform's parameters
    return sha256_file(checkpoint_path(builtin))


def check_backbone(head: ReleasedHead, backbone_options: dict) -> None:
    """Refuse a backbone whose checkpoint is not the one the head was trained on."""
    feats = head.metadata["features"]
    name = feats["backbone"]
    sha256 = checkpoint_sha256(name, backbone_options)
    if sha256 != feats.get("checkpoint_sha256"):
        raise ClassifyError(
            f"backbone {name!r}: its checkpoint has sha256 {sha256}, but the head was trained "
            f"on features from checkpoint {feats.get('checkpoint_sha256')}; point "
            f"backbones.{name}.checkpoint in the config at the file the head was trained with"
        )


def classify(
    head_path: str | os.PathLike,
    *,
    out: str | os.PathLike,
    images: Sequence[str | os.PathLike] = (),
    dataset: str | None = None,
    split: str = "test",
    config: dict | None = None,
) -> dict:
    """Write the predictions CSV; return a summary (n, accuracy when labels are known)."""
    from pipeline_lib.experiments import backbone_options
    from pipeline_lib.features.extract import extract_to_store
    from pipeline_lib.features.store import FeatureStore

    config = config or {}
    head = load_head(head_path)
    feats = head.metadata.get("features")
    if not feats or "checkpoint_sha256" not in feats:
        raise ClassifyError(
            f"{head_path}: this head does not record how its features were made (written "
            "before class names and feature provenance were stored); delete it and its "
            "metrics.json and rerun snakemake to release it again"
        )
    if bool(images) == (dataset is not None):
        raise ClassifyError("give either images (files or folders) or --dataset, not both")
    if "sources" in feats:
        raise ClassifyError(
            f"{head_path}: this head was trained on the feature combination "
            f"{feats['backbone']!r} ({len(feats['sources'])} source stores: "
            f"{', '.join(s['backbone'] + '@' + str(s['image_size']) for s in feats['sources'])}); "
            "classify cannot compute combined features of new images yet"
        )
    options = backbone_options(config, feats["backbone"])
    check_backbone(head, options)
    if dataset is not None:
        from pipeline_lib.data import open_dataset

        specs = config.get("datasets") or {}
        if dataset not in specs:
            raise ClassifyError(
                f"--dataset {dataset!r}: not a key of 'datasets' in the config "
                f"(keys: {sorted(specs)}); pass --config with the config that defines it"
            )
        source = open_dataset(dataset, specs[dataset], split)
        names = [f"{dataset}/{split}/{i}" for i in range(source.num_examples)]
        known = True
    else:
        files = find_images(images)
        source, known = _file_source(files, head)
        names = files
    with tempfile.TemporaryDirectory(prefix="classify-") as tmp:
        store_path = Path(tmp, "features.zarr")
        extract_to_store(
            source,
            backbone_name=feats["backbone"],
            out_path=store_path,
            image_size=int(feats["image_size"]),
            batch_size=int(feats.get("batch_size", 64)),
            chunk_rows=int(feats.get("chunk_rows", 1024)),
            dtype=feats.get("compute_dtype", "float32"),
            progress=False,
            backbone_options=options,
        )
        store = FeatureStore(store_path)
        if store.attrs["checkpoint_sha256"] != feats["checkpoint_sha256"]:  # belt and braces
            raise ClassifyError(f"{head_path}: the checkpoint changed while classifying")
        if store.attrs.get("tta", "none") != feats.get("tta", "none"):
            raise ClassifyError(
                f"backbone {feats['backbone']!r}: the head was trained on features with "
                f"tta={feats.get('tta', 'none')!r}, but the config's entry gives "
                f"tta={store.attrs.get('tta', 'none')!r}; set backbones.{feats['backbone']}.tta "
                "as in training"
            )
        if store.feature_dim != head.weights.shape[0]:
            raise ClassifyError(
                f"backbone {feats['backbone']!r} gave {store.feature_dim}-d features; the head "
                f"expects {head.weights.shape[0]}"
            )
        if store.attrs["preprocessing"] != feats.get("preprocessing"):
            print(
                f"classify: WARNING: preprocessing differs from training: "
                f"{store.attrs['preprocessing']!r} here, {feats.get('preprocessing')!r} there",
                file=sys.stderr,
            )
        predicted, scores, truth = [], [], []
        for x, y in store.iter_chunks():
            logits = head.logits(x)
            predicted.append(np.argmax(logits, axis=-1))
            scores.append(np.max(logits, axis=-1))
            truth.append(y)
    predicted, scores, truth = map(np.concatenate, (predicted, scores, truth))
    class_names = head.class_names
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label_name", "label_index", "score"])
        for name, label, score in zip(names, predicted, scores, strict=True):
            writer.writerow([name, class_names[label], int(label), f"{float(score):.6g}"])
    summary: dict = {"num_images": int(len(predicted)), "out": str(out)}
    if known:
        summary["num_correct"] = int(np.sum(predicted == truth))
        summary["accuracy"] = summary["num_correct"] / len(predicted)
    return summary


def _load_config(path: str | None) -> dict:
    import yaml

    if path is None:
        default = Path("config/config.yaml")
        return yaml.safe_load(default.read_text()) if default.is_file() else {}
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ClassifyError(f"--config {path}: cannot read it ({exc})") from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline_lib.classify",
        description="Classify images with a released head (head.npz); writes a CSV of "
        "file, label_name, label_index, score.",
    )
    parser.add_argument("--head", required=True, help="a released head.npz")
    parser.add_argument("--images", nargs="+", default=[], help="image files and/or folders")
    parser.add_argument("--dataset", help="a key of 'datasets' in the config, instead of images")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--out", required=True, help="the predictions CSV to write")
    parser.add_argument(
        "--config",
        help="the workflow config, for --dataset and config-defined backbones "
        "(default: config/config.yaml if present)",
    )
    args = parser.parse_args(argv)
    try:
        summary = classify(
            args.head,
            out=args.out,
            images=args.images,
            dataset=args.dataset,
            split=args.split,
            config=_load_config(args.config),
        )
    except (ClassifyError, ValueError, FileNotFoundError) as exc:
        print(f"classify: ERROR: {exc}", file=sys.stderr)
        return 2
    line = f"classify: {summary['num_images']} images -> {summary['out']}"
    if "accuracy" in summary:
        line += f"; accuracy {summary['accuracy']:.4f} ({summary['num_correct']} correct)"
    metrics = Path(args.head).with_name("metrics.json")
    if metrics.is_file():
        import json

        line += (
            f"; the run's test accuracy was {json.loads(metrics.read_text())['test_accuracy']:.4f}"
        )
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
