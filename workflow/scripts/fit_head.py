"""Adapter: rule fit_head -> pipeline_lib.runner.run_head."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _log  # noqa: E402

from pipeline_lib.runner import run_head  # noqa: E402

log = _log.setup(snakemake)  # noqa: F821
inp, out = snakemake.input, snakemake.output  # noqa: F821
record = run_head(
    dict(snakemake.params.spec),  # noqa: F821
    train_store=inp.train,
    test_store=inp.test,
    metrics_path=out.metrics,
    head_path=out.head,
    public_train_store=inp.get("public_train"),
    public_test_store=inp.get("public_test"),
)
log.info("%s", json.dumps(record, indent=2))
