"""Adapter: rule extract_features -> pipeline_lib.features.extract.extract_to_store."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _log  # noqa: E402

from pipeline_lib.data import load_dataset  # noqa: E402
from pipeline_lib.features.extract import extract_to_store  # noqa: E402

log = _log.setup(snakemake)  # noqa: F821
w, p = snakemake.wildcards, snakemake.params  # noqa: F821
data = load_dataset(**p.data)
log.info("loaded %s/%s: %d images from %s", data.name, data.split, len(data.labels), data.source)
result = extract_to_store(
    data,
    backbone_name=w.backbone,
    out_path=snakemake.output.store,  # noqa: F821
    image_size=int(w.image_size),
    batch_size=int(p.extraction["batch_size"]),
    chunk_rows=int(p.extraction["chunk_rows"]),
    dtype=p.extraction.get("dtype", "float32"),
)
log.info("extraction: %s", result)
