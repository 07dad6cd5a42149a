"""The three Snakemake jobs that build one feature store: init, shard, finalize.

Each job's declared output is a small JSON file in the store's work directory
(``<store>.inprogress/jobs/``), written by atomic rename when the job has
finished. The chunk data and the per-chunk done markers are never a declared
output, so when Snakemake deletes the outputs of a killed job before rerunning
it, finished chunks survive and the rerun resumes. The finalize job's output
is the store itself; publishing it deletes the work directory with the job
files.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline_lib.data import open_dataset
from pipeline_lib.features import extract
from pipeline_lib.features.store import UnfinishedChunksDamagedError

log = logging.getLogger(__name__)

__all__ = ["read_json", "run_finalize_job", "run_init_job", "run_shard_job", "write_json"]


def write_json(path: str | os.PathLike, payload: Mapping) -> None:
    """Write ``payload`` to ``path`` atomically: the file appears whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def run_init_job(
    *,
    dataset: str,
    dataset_spec: Mapping,
    split: str,
    backbone: str,
    image_size: int,
    extraction: Mapping,
    backbone_options: Mapping,
    store: str | os.PathLike,
    done_file: str | os.PathLike,
) -> dict:
    """Create (or check) the work directory of ``store``; write its attributes to ``done_file``."""
    from pipeline_lib.features.verify import make_recipe

    source = open_dataset(dataset, dataset_spec, split)
    attrs = extract.init_store(
        source,
        backbone_name=backbone,
        out_path=store,
        image_size=int(image_size),
        settings=extract.ExtractionSettings.from_config(extraction),
        backbone_options=backbone_options,
        recipe=make_recipe(
            dataset=dataset,
            dataset_spec=dataset_spec,
            split=split,
            backbone=backbone,
            backbone_options=backbone_options,
            extraction=extraction,
        ),
    )
    log.info("store %s: %s", store, attrs)
    write_json(done_file, attrs)
    return attrs


def run_shard_job(
    *,
    dataset: str,
    dataset_spec: Mapping,
    split: str,
    backbone: str,
    image_size: int,
    extraction: Mapping,
    backbone_options: Mapping,
    store: str | os.PathLike,
    shard: int,
    num_shards: int,
    done_file: str | os.PathLike,
) -> dict:
    """Fill shard ``shard`` of ``num_shards``; write its throughput figures to ``done_file``."""
    source = open_dataset(dataset, dataset_spec, split)
    stats = extract.extract_shard(
        source,
        backbone_name=backbone,
        out_path=store,
        image_size=int(image_size),
        settings=extract.ExtractionSettings.from_config(extraction),
        shard=int(shard),
        num_shards=int(num_shards),
        backbone_options=backbone_options,
    )
    write_json(done_file, stats)
    return stats


def run_finalize_job(*, store: str | os.PathLike, shard_files: Sequence[str | os.PathLike]) -> dict:
    """Check and publish ``store``, recording the shards' figures in its attributes.

    When finished chunks were damaged on disk before publishing, their done
    markers and every shard job's output are removed, so that the next
    ``snakemake`` run reruns the shard jobs, which redo exactly those chunks.
    """
    try:
        stats = extract.finalize_extraction(store, [read_json(p) for p in shard_files])
    except UnfinishedChunksDamagedError:
        for p in shard_files:
            Path(p).unlink(missing_ok=True)
        raise
    log.info(
        "published %s: %d images extracted by %d shard job(s), %s img/s per job",
        store,
        stats["images_extracted"],
        stats["num_shards"],
        stats["images_per_second_per_job"],
    )
    return stats
