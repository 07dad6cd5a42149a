"""Adapter: rule compute_stats -> pipeline_lib.heads.stats (statistics are never released)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _log  # noqa: E402

from pipeline_lib.features.split import RowSubset  # noqa: E402
from pipeline_lib.features.store import FeatureStore  # noqa: E402
from pipeline_lib.heads.stats import compute_stats, save_stats  # noqa: E402

log = _log.setup(snakemake)  # noqa: F821
data = FeatureStore(snakemake.input.train)  # noqa: F821
part = snakemake.params.part  # noqa: F821  ("all", or "fit<f>": minus a validation part f)
if part != "all":
    data = RowSubset(data, part="fit", fraction=float(part.removeprefix("fit")))
stats = compute_stats(
    data,
    l2_clip_norm=snakemake.params.l2_clip_norm,  # noqa: F821
    transform=snakemake.params.transform,  # noqa: F821
)
save_stats(stats, snakemake.output.stats)  # noqa: F821
log.info(
    "stats over %d examples (%s), d=%d, K=%d",
    stats.num_examples,
    part,
    stats.feature_dim,
    stats.num_classes,
)
