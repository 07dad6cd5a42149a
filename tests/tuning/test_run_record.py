"""What the runner writes is a RunRecord: metrics.json, head.npz's metadata and run_head's
return value agree, and every key is in exactly one field group."""

import json

import numpy as np

from pipeline_lib.heads.released import load_head
from pipeline_lib.run_contract import INTERNAL_FIELDS, RELEASED_FIELDS, RunRecord


def test_runner_writes_one_record_everywhere(stores, make_config, run_method):
    root, st = stores
    cfg = make_config(root, {"dp_ls": {}}, baselines={"nonprivate_ridge": {}})
    for method in ("dp_ls", "nonprivate_ridge"):
        record, out = run_method(root, st, cfg, method)
        metrics = json.loads(open(out["metrics"]).read())
        loaded = RunRecord.from_json(metrics, out["metrics"])
        assert set(metrics) <= set(RELEASED_FIELDS) | set(INTERNAL_FIELDS)
        assert {k: v for k, v in metrics.items() if not k.endswith("sha256")} == record
        head = load_head(out["head"])
        assert head.metadata.to_json() == record  # the head carries the same record
        assert head.metadata.released() == loaded.released()
        assert "timings_s" in record and "timings_s" not in loaded.released()
        assert "train_accuracy" not in record
        assert np.isfinite(loaded.test_accuracy)
