"""run_head draws secret noise per job: reruns differ, reproducible mode is labelled, and
no key material reaches any output file."""

import base64
import json

import numpy as np
import pytest

from pipeline_lib import experiments as xp
from pipeline_lib import reporting
from pipeline_lib.privacy import noise
from pipeline_lib.privacy.ledger import compose_ledger

REPRO = {"mode": "reproducible", "seed": 0}
CASES = {
    "dp_ls": ({"dp_ls": {}}, None),
    "dp_newton": ({"dp_newton": {"num_steps": 2}}, None),
    "dp_fc": ({"dp_fc": {"num_steps": 3}}, None),
    "dp_sgd": ({"dp_sgd": {"batch_size": 512, "epochs": 2}}, None),
    "dp_ls_tuned": (
        {"dp_ls": {"ridge_noise_factor": [0.1, 1.0]}},
        {"selection": "private", "validation_fraction": 0.2},
    ),
}


def _fit_twice(stores, make_config, run_method, case, **extra):
    root, st = stores
    methods, tuning = CASES[case]
    method = next(iter(methods))
    cfg = make_config(root, methods, tuning, **extra)
    weights, records = [], []
    for _ in range(2):
        record, out = run_method(root, st, cfg, method)
        with np.load(out["head"]) as z:
            weights.append(np.concatenate([z["weights"].ravel(), z["bias"].ravel()]))
            records.append(json.loads(str(z["metadata"])))
        assert json.loads(open(out["metrics"]).read())["noise"] == record["noise"]
    return weights, records


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_config_twice_gives_new_noise(stores, make_config, run_method, case):
    (a, b), (ra, rb) = _fit_twice(stores, make_config, run_method, case)
    assert not np.allclose(a, b), "a rerun must be a new release with new noise"
    for record in (ra, rb):
        assert record["noise"]["mode"] == "secret"
        assert record["differentially_private"] is True
        assert noise.NOT_PRIVATE_NOTICE not in record["privacy_statement"]
        assert "Treated as public" in record["privacy_statement"]
        assert "side channels" in record["privacy_statement"]


@pytest.mark.parametrize("case", ["dp_ls", "dp_sgd", "dp_ls_tuned"])
def test_reproducible_mode_is_identical_and_says_not_private(stores, make_config, run_method, case):
    (a, b), (ra, _) = _fit_twice(stores, make_config, run_method, case, noise=REPRO)
    np.testing.assert_array_equal(a, b)
    assert ra["noise"]["mode"] == "reproducible" and ra["differentially_private"] is False
    assert ra["privacy_statement"].startswith(noise.NOT_PRIVATE_NOTICE)
    assert ra["noise"]["notice"] == noise.NOT_PRIVATE_NOTICE


def test_public_quantities_are_stated(stores, make_config, run_method):
    root, st = stores
    cfg = make_config(root, {"dp_sgd": {"batch_size": 512, "epochs": 1}})
    record, _ = run_method(root, st, cfg, "dp_sgd")
    public = record["public_quantities"]
    assert public["num_train"] == 3000
    assert public["sampling_prob"] == pytest.approx(512 / 3000)
    assert "(3000)" in record["privacy_statement"] and "q = B/N" in record["privacy_statement"]
    tuned_cfg = make_config(root, *CASES["dp_ls_tuned"])
    tuned, _ = run_method(root, st, tuned_cfg, "dp_ls")
    q = tuned["public_quantities"]
    assert q["num_train_fit"] + q["num_validation"] == 3000 and q["num_validation"] > 0


def _encodings(raw: bytes) -> list[bytes]:
    """Every way the 8 key bytes (or one of their 32-bit words) could be written out."""
    words = [int.from_bytes(raw[:4], "little"), int.from_bytes(raw[4:], "little")]
    out = [raw, raw[:4], raw[4:], raw.hex().encode(), raw.hex().upper().encode()]
    out += [base64.b64encode(raw), str(int.from_bytes(raw, "little")).encode()]
    out += [str(int.from_bytes(raw, "big")).encode()]
    out += [str(w).encode() for w in words if w >= 10**6]  # short numbers occur by chance
    out += [np.asarray(words, np.uint32).tobytes()]
    return out


def test_no_key_material_in_any_output(stores, make_config, run_method, monkeypatch):
    """Every key made during the runs (base keys and children) is searched for in every
    file the runs wrote, in every plausible encoding."""
    made = []
    real = noise.NoiseKey._from_bytes.__func__

    def spy(cls, raw, *, reproducible):
        made.append(bytes(raw[:8]))
        return real(cls, raw, reproducible=reproducible)

    monkeypatch.setattr(noise.NoiseKey, "_from_bytes", classmethod(spy))
    root, st = stores
    results = root / "results"
    for case in ("dp_ls", "dp_sgd", "dp_fc", "dp_ls_tuned"):
        methods, tuning = CASES[case]
        run_method(root, st, make_config(root, methods, tuning), next(iter(methods)))
    assert len(made) >= 4 + 3  # 4 base keys, 2 candidates + the selection
    files = [p for p in results.rglob("*") if p.is_file()]
    assert any(p.name == "head.npz" for p in files) and any(p.suffix == ".json" for p in files)
    for path in files:
        blob = path.read_bytes()
        for raw in made:
            for enc in _encodings(raw):
                assert enc not in blob, f"key material found in {path}"


def test_reports_keep_reproducible_runs_apart(stores, make_config, run_method, tmp_path):
    root, st = stores
    dp_cfg = make_config(root, {"dp_ls": {}})
    _, dp_out = run_method(root, st, dp_cfg, "dp_ls")
    repro_cfg = make_config(root, {"dp_ls": {}}, noise=REPRO)
    repro_cfg["experiments"] = {"r": repro_cfg["experiments"]["e"]}
    _, repro_out = run_method(root, st, repro_cfg, "dp_ls")
    paths = [dp_out["metrics"], repro_out["metrics"]]
    runs = reporting.load_runs(paths)

    ledger = compose_ledger(runs)
    assert [row.num_releases for row in ledger] == [1]  # the reproducible run is not in it

    rows = reporting.summarize(runs)
    repro = [r for r in rows if r.reproducible_noise]
    assert len(repro) == 1 and "NOT DP" in repro[0].privacy_label
    assert rows[-1] is repro[0]  # sorted after every DP row
    assert [key[0] for key in reporting.best_per_epsilon(rows)] == ["e"]  # "r" is not DP

    outputs = {k: tmp_path / "rep" / name for k, name in xp.REPORT_FILES.items()}
    out = reporting.build_report(paths, outputs, "mixed")
    md = out["md"].read_text()
    assert "What the privacy guarantee covers" in md and "Treated as public" in md
    assert "NOT DP (reproducible noise" in md and "are NOT differentially private" in md
    assert "NOT DP: reproducible noise" in out["csv"].read_text()
    assert "reproducible" in out["runs"].read_text()

    names = ("index", "ledger_csv", "ledger_md", "png")
    idx = reporting.build_index(paths, {k: tmp_path / "idx" / f"{k}.out" for k in names})
    index = idx["index"].read_text()
    ledger_md = idx["ledger_md"].read_text()
    for text in (index, ledger_md):
        assert "1 run(s) with reproducible noise (NOT DP)" in text
        assert "0 non-private baseline run(s)" in text
        assert "outside any guarantee" in text
    assert "Not protected against" in index


def test_released_head_says_whether_it_is_differentially_private(stores, make_config, run_method):
    from pipeline_lib.heads.released import load_head

    root, st = stores
    _, secret = run_method(root, st, make_config(root, {"dp_ls": {}}), "dp_ls")
    repro_cfg = make_config(root, {"dp_ls": {}}, noise=REPRO)
    repro_cfg["experiments"] = {"r": repro_cfg["experiments"]["e"]}
    _, repro = run_method(root, st, repro_cfg, "dp_ls")
    assert load_head(secret["head"]).differentially_private is True
    head = load_head(repro["head"])
    assert head.private and head.differentially_private is False
    assert head.metadata["privacy_statement"].startswith(noise.NOT_PRIVATE_NOTICE)
