"""Reports from synthetic metrics.json files: numbers, labels, files, and refusals."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pipeline_lib.reporting as reporting
from pipeline_lib.experiments import REPORT_FILES
from pipeline_lib.reporting import (
    MetricsError,
    build_report,
    load_runs,
    plot_accuracy_vs_epsilon,
    summarize,
    write_summary_csv,
    write_summary_md,
)


def _dp_run(method="dp_ls", epsilon=1.0, seed=0, accuracy=0.8, spent=None, nm=4.1, **extra):
    run = {
        "experiment": "fmnist_lite0",
        "method": method,
        "private": True,
        "seed": seed,
        "target_epsilon": epsilon,
        "target_delta": 1e-5,
        "spent_epsilon": epsilon * 0.999 if spent is None else spent,
        "spent_delta": 1e-5,
        "accountant": "pld",
        "neighboring_relation": "add_or_remove_one",
        "noise_multipliers": {"xtx": nm, "xty": nm},
        "test_accuracy": accuracy,
        "dataset": "fashion_mnist",
        "backbone": "efficientnet_lite0",
        "privacy_statement": "(eps, delta)-DP, add or remove one example",
    }
    run.update(extra)
    return run


def _baseline_run(method="nonprivate_ridge", seed=0, accuracy=0.865, **extra):
    run = {
        "experiment": "fmnist_lite0",
        "method": method,
        "private": False,
        "seed": seed,
        "target_epsilon": None,
        "target_delta": None,
        "spent_epsilon": None,
        "spent_delta": None,
        "accountant": None,
        "neighboring_relation": None,
        "noise_multipliers": {},
        "test_accuracy": accuracy,
    }
    run.update(extra)
    return run


def _outputs(folder):
    """The outputs of rule report_experiment, in ``folder``."""
    return {kind: folder / name for kind, name in REPORT_FILES.items()}


def _write_runs(folder, runs):
    paths = []
    for i, run in enumerate(runs):
        path = folder / f"run{i:03d}" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(run))
        paths.append(path)
    return paths


# Five seeds of dp_ls at eps=1, four at eps=0.25 (even count), one at eps=8, two
# dp_newton seeds, three ridge baseline seeds and one logistic baseline seed.
DP1_ACC = [0.80, 0.82, 0.81, 0.79, 0.85]
DP1_SPENT = [0.998, 0.999, 0.997, 0.9995, 0.998]
DP1_NM = [4.1, 4.2, 4.0, 4.1, 4.3]
DP025_ACC = [0.70, 0.74, 0.72, 0.78]
RIDGE_ACC = [0.865, 0.864, 0.866]


def _all_runs():
    runs = [
        _dp_run(epsilon=1.0, seed=s, accuracy=a, spent=e, nm=m)
        for s, (a, e, m) in enumerate(zip(DP1_ACC, DP1_SPENT, DP1_NM, strict=True))
    ]
    runs += [_dp_run(epsilon=0.25, seed=s, accuracy=a) for s, a in enumerate(DP025_ACC)]
    runs += [_dp_run(epsilon=8.0, seed=0, accuracy=0.848, spent=8.0)]  # exactly at target: fine
    runs += [_dp_run(method="dp_newton", epsilon=1.0, seed=s, accuracy=0.77) for s in (0, 1)]
    runs += [_baseline_run(seed=s, accuracy=a) for s, a in enumerate(RIDGE_ACC)]
    runs += [_baseline_run(method="nonprivate_logistic", accuracy=0.876)]
    return runs


@pytest.fixture
def rows(tmp_path):
    return summarize(load_runs(_write_runs(tmp_path / "runs", _all_runs())))


def _row(rows, method, epsilon):
    (match,) = [r for r in rows if r.method == method and r.target_epsilon == epsilon]
    return match


# --- summarize ----------------------------------------------------------------------


def test_rows_are_sorted_by_method_then_epsilon(rows):
    assert [(r.method, r.target_epsilon) for r in rows] == [
        ("dp_ls", 0.25),
        ("dp_ls", 1.0),
        ("dp_ls", 8.0),
        ("dp_newton", 1.0),
        ("nonprivate_logistic", None),
        ("nonprivate_ridge", None),
    ]


def test_medians_and_spreads(rows):
    dp1 = _row(rows, "dp_ls", 1.0)
    assert dp1.n_seeds == 5 and dp1.seeds == (0, 1, 2, 3, 4)
    assert dp1.median_test_accuracy == pytest.approx(0.81)
    assert dp1.min_test_accuracy == pytest.approx(0.79)
    assert dp1.max_test_accuracy == pytest.approx(0.85)
    assert dp1.spread_test_accuracy == pytest.approx(0.06)
    assert dp1.median_spent_epsilon == pytest.approx(0.998)
    assert dict(dp1.noise_multipliers) == pytest.approx({"xtx": 4.1, "xty": 4.1})
    assert (dp1.target_delta, dp1.accountant) == (1e-5, "pld")
    assert dp1.neighboring_relation == "add_or_remove_one"

    dp025 = _row(rows, "dp_ls", 0.25)  # even number of seeds: mean of the middle two
    assert dp025.median_test_accuracy == pytest.approx((0.72 + 0.74) / 2)
    assert dp025.spread_test_accuracy == pytest.approx(0.08)

    ridge = _row(rows, "nonprivate_ridge", None)
    assert not ridge.private and ridge.n_seeds == 3
    assert ridge.median_test_accuracy == pytest.approx(0.865)
    assert ridge.spread_test_accuracy == pytest.approx(0.002)
    assert ridge.median_spent_epsilon is None and dict(ridge.noise_multipliers) == {}
    assert ridge.privacy_label == "non-private"
    assert dp1.privacy_label == "(ε, δ) = (1, 1e-05), pld"


def test_groups_split_on_accountant_and_delta(tmp_path):
    runs = [
        _dp_run(seed=0, accuracy=0.8),
        _dp_run(seed=0, accuracy=0.7, accountant="rdp"),
        _dp_run(seed=0, accuracy=0.6, target_delta=1e-6, spent_delta=1e-6),
    ]
    rows = summarize(load_runs(_write_runs(tmp_path, runs)))
    assert sorted((r.target_delta, r.accountant, r.median_test_accuracy) for r in rows) == [
        (1e-6, "pld", 0.6),
        (1e-5, "pld", 0.8),
        (1e-5, "rdp", 0.7),
    ]


@given(st.lists(st.floats(0, 1), min_size=1, max_size=9))
def test_summary_invariants(accuracies):
    runs = [_dp_run(seed=s, accuracy=a) for s, a in enumerate(accuracies)]
    (row,) = summarize(runs)
    assert row.min_test_accuracy <= row.median_test_accuracy <= row.max_test_accuracy
    assert row.spread_test_accuracy == row.max_test_accuracy - row.min_test_accuracy >= 0
    assert row.median_test_accuracy == statistics.median(accuracies)
    assert row.n_seeds == len(accuracies)


def test_summarize_rejects_mixed_neighbouring_relations():
    runs = [_dp_run(seed=0), _dp_run(seed=1, neighboring_relation="replace_one")]
    with pytest.raises(ValueError, match="disagree on the neighbouring relation"):
        summarize(runs)


def test_summarize_needs_runs():
    with pytest.raises(ValueError, match="no runs"):
        summarize([])


# --- load_runs refusals ------------------------------------------------------------------


def test_overstated_epsilon_is_rejected(tmp_path):
    paths = _write_runs(tmp_path, [_dp_run(seed=0), _dp_run(seed=1, epsilon=1.0, spent=1.0001)])
    with pytest.raises(MetricsError) as info:
        load_runs(paths)
    assert str(info.value).startswith(
        f"{paths[1]}: spent_epsilon 1.0001 exceeds target_epsilon 1.0"
    )
    assert "overstate" in str(info.value)


def test_epsilon_within_round_off_is_accepted(tmp_path):
    (run,) = load_runs(_write_runs(tmp_path, [_dp_run(epsilon=1.0, spent=1.0 + 1e-12)]))
    assert run["spent_epsilon"] == 1.0 + 1e-12


def test_overstated_delta_is_rejected(tmp_path):
    paths = _write_runs(tmp_path, [_dp_run(spent_delta=2e-5)])
    with pytest.raises(MetricsError, match=r"spent_delta 2e-05 exceeds target_delta 1e-05"):
        load_runs(paths)


def test_bad_json_names_the_file(tmp_path):
    path = tmp_path / "exp" / "metrics.json"
    path.parent.mkdir()
    path.write_text('{"experiment": "x",\n "method": }')
    with pytest.raises(MetricsError) as info:
        load_runs([path])
    assert str(info.value) == f"{path}: not valid JSON: Expecting value at line 2, column 12"


def test_binary_file_names_the_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff")
    with pytest.raises(MetricsError, match=rf"^{path}: not valid UTF-8 text"):
        load_runs([path])


def test_json_that_is_not_an_object(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("[1, 2]")
    with pytest.raises(MetricsError, match=rf"^{path}: expected a JSON object, got list$"):
        load_runs([path])


def test_missing_keys_are_listed(tmp_path):
    run = _dp_run()
    del run["spent_epsilon"], run["accountant"]
    (path,) = _write_runs(tmp_path, [run])
    with pytest.raises(
        MetricsError, match=rf"^{path}: missing required keys: spent_epsilon, accountant$"
    ):
        load_runs([path])


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"test_accuracy": 81.2}, r"test_accuracy must be a fraction in \[0, 1\], got 81.2"),
        ({"test_accuracy": float("nan")}, r"test_accuracy must be a fraction"),
        ({"private": "yes"}, r"private must be true or false"),
        ({"seed": 1.5}, r"seed must be an integer"),
        ({"target_epsilon": 0}, r"target_epsilon must be a number > 0"),
        ({"target_delta": None}, r"target_delta must be in \(0, 1\)"),
        ({"accountant": None}, r"accountant must be a non-empty string"),
        ({"noise_multipliers": {}}, r"noise_multipliers is empty for a private run"),
        ({"noise_multipliers": {"xtx": -1}}, r"noise_multipliers\['xtx'\] must be a number > 0"),
    ],
)
def test_ill_typed_private_runs(tmp_path, overrides, pattern):
    (path,) = _write_runs(tmp_path, [_dp_run(**overrides)])
    with pytest.raises(MetricsError, match=pattern) as info:
        load_runs([path])
    assert str(info.value).startswith(f"{path}: ")


def test_nonprivate_run_with_a_budget_is_rejected(tmp_path):
    (path,) = _write_runs(tmp_path, [_baseline_run(target_epsilon=1.0)])
    with pytest.raises(
        MetricsError, match=r"private is false, but the run carries privacy .*target_epsilon"
    ):
        load_runs([path])


def test_duplicate_seed_is_rejected(tmp_path):
    paths = _write_runs(tmp_path, [_dp_run(seed=3), _dp_run(seed=3, accuracy=0.9)])
    with pytest.raises(MetricsError, match=rf"^{paths[1]}: duplicate run: {paths[0]} .*seed 3"):
        load_runs(paths)


# --- writers -----------------------------------------------------------------------------


def test_csv_content(tmp_path, rows):
    path = tmp_path / "summary.csv"
    write_summary_csv(rows, path)
    with open(path, newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f))
    assert len(records) == len(rows)
    dp1 = records[1]
    assert (dp1["method"], dp1["private"], dp1["target_epsilon"]) == ("dp_ls", "true", "1.0")
    assert dp1["privacy"] == "(ε, δ) = (1, 1e-05), pld"
    assert float(dp1["median_test_accuracy"]) == pytest.approx(0.81)
    assert float(dp1["spread_test_accuracy"]) == pytest.approx(0.06)
    assert float(dp1["median_spent_epsilon"]) == pytest.approx(0.998)
    assert float(dp1["noise_multiplier_xtx"]) == pytest.approx(4.1)
    assert dp1["seeds"] == "0;1;2;3;4" and dp1["n_seeds"] == "5"
    ridge = records[-1]
    assert (ridge["method"], ridge["private"], ridge["privacy"]) == (
        "nonprivate_ridge",
        "false",
        "non-private",
    )
    assert ridge["target_epsilon"] == ridge["median_spent_epsilon"] == ridge["accountant"] == ""
    assert ridge["noise_multiplier_xtx"] == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "summary.csv"]  # no temp file


def test_markdown_content(tmp_path, rows):
    path = tmp_path / "summary.md"
    write_summary_md(rows, path, title="Fashion-MNIST, Lite0")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0] == "# Fashion-MNIST, Lite0"
    assert "δ = 1e-05, accountant: pld, neighbouring relation: add_or_remove_one" in text
    assert "| Privacy (ε, δ) |" in text
    setting = "fashion_mnist/efficientnet_lite0"
    dp1 = next(
        line
        for line in lines
        if line.startswith(f"| fmnist_lite0 | {setting} | dp_ls | (1, 1e-05) |")
    )
    assert (
        "| pld | 0.998 | 0.998 | no (fixed in config) "
        "| 81.00% | 79.00% | 85.00% | 6.00 | — | — | 5 | xtx=4.1, xty=4.1 |"
    ) in dp1
    ridge = next(line for line in lines if "| nonprivate_ridge |" in line)
    assert ridge == (
        "| fmnist_lite0 | — | nonprivate_ridge | non-private | — | — | — | — "
        "| 86.50% | 86.40% | 86.60% | 0.20 | 1.10 | — | 3 | — |"
    )
    table = [line for line in lines if line.startswith("| fmnist_lite0 |")]
    assert len(table) == len(rows)
    # Every table row either is labelled non-private or states its (ε, δ).
    assert all("| non-private |" in line or ", 1e-05) |" in line for line in table)


def test_markdown_with_mixed_settings_says_so(tmp_path):
    runs = [_dp_run(), _dp_run(accountant="rdp")]
    path = tmp_path / "summary.md"
    write_summary_md(summarize(runs), path)
    assert "several (δ, accountant) settings; each row states its own" in path.read_text()


def test_plot(tmp_path, rows):
    path = tmp_path / "acc.png"
    fig = plot_accuracy_vs_epsilon(rows, path, title="Fashion-MNIST")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert "δ = 1e-05" in ax.get_title() and "accountant: pld" in ax.get_title()
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == [
        "dp_ls",
        "dp_newton",
        "nonprivate_logistic (non-private)",
        "nonprivate_ridge (non-private)",
    ]
    # The dp_ls line runs through the medians, in %, at increasing epsilon.
    xs, ys = ax.lines[0].get_data()
    assert list(xs) == [0.25, 1.0, 8.0]
    assert list(ys) == pytest.approx([73.0, 81.0, 84.8])
    # Baselines are dashed horizontal lines at their median.
    ridge_line = next(line for line in ax.lines if line.get_label().startswith("nonprivate_ridge"))
    assert ridge_line.get_linestyle() != "-"
    assert list(ridge_line.get_ydata()) == pytest.approx([86.5, 86.5])


def test_plot_with_baselines_only(tmp_path):
    path = tmp_path / "acc.png"
    fig = plot_accuracy_vs_epsilon(summarize([_baseline_run()]), path)
    assert path.stat().st_size > 0
    assert "non-private baselines only" in fig.axes[0].get_title()


# --- build_report -------------------------------------------------------------------------


def test_build_report(tmp_path):
    paths = _write_runs(tmp_path / "runs", _all_runs())
    out = tmp_path / "reports" / "fmnist"
    outputs = build_report(paths, _outputs(out), "Fashion-MNIST, Lite0")
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy_vs_epsilon.png",
        "confusion.png",
        "per_class.csv",
        "runs.csv",
        "summary.csv",
        "summary.md",
    ]
    assert outputs == {
        "csv": out / "summary.csv",
        "md": out / "summary.md",
        "runs": out / "runs.csv",
        "png": out / "accuracy_vs_epsilon.png",
        "per_class": out / "per_class.csv",
        "confusion": out / "confusion.png",
    }
    assert all(p.stat().st_size > 0 for p in outputs.values())
    runs = list(csv.DictReader(open(outputs["runs"])))
    assert len(runs) == len(paths)  # one row per run, with its own accuracy and epsilon
    assert {float(r["test_accuracy"]) for r in runs} == {
        json.loads(open(p).read())["test_accuracy"] for p in paths
    }
    assert outputs["md"].read_text().startswith("# Fashion-MNIST, Lite0\n")


def test_build_report_bad_input_leaves_nothing(tmp_path):
    out = tmp_path / "report"
    good = _write_runs(tmp_path / "good", _all_runs())
    build_report(good, _outputs(out), "first")
    bad = _write_runs(tmp_path / "bad", [_dp_run(spent=1.5)])
    with pytest.raises(MetricsError, match="exceeds target_epsilon"):
        build_report(good + bad, _outputs(out), "second")
    assert list(out.iterdir()) == []  # the stale report is gone, and nothing new appeared


def test_build_report_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    def broken_plot(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(reporting, "_plot", broken_plot)
    out = tmp_path / "report"
    with pytest.raises(RuntimeError, match="disk full"):
        build_report(_write_runs(tmp_path / "runs", _all_runs()), _outputs(out), "t")
    assert list(out.iterdir()) == []  # csv and md were written to temp names, then removed


def test_build_report_needs_inputs(tmp_path):
    with pytest.raises(ValueError, match="no metrics files"):
        build_report([], _outputs(tmp_path / "out"), "t")


# --- per-class accuracy, confusion matrices, wall time, gap to the probe, axes ---------


def _cm(acc, k=3, n=100):
    """A k x k confusion matrix with n test examples per class and accuracy `acc`."""
    right = round(acc * n)
    return [[right if j == i else (n - right if j == (i + 1) % k else 0) for j in range(k)]
            for i in range(k)]  # fmt: skip


DATA = {"dataset": "fashion_mnist", "backbone": "efficientnet_lite0"}


def test_per_class_confusion_time_and_gap(tmp_path):
    runs = [
        _dp_run(seed=s, accuracy=a, test_confusion=_cm(a), timings_s={"fit": t, "evaluate": 1.0})
        for s, (a, t) in enumerate([(0.80, 3.0), (0.90, 5.0), (0.70, 4.0)])
    ]
    runs += [
        _baseline_run("nonprivate_logistic", accuracy=0.95, test_confusion=_cm(0.95), **DATA),
        _baseline_run("nonprivate_ridge", accuracy=0.97, test_confusion=_cm(0.97), **DATA),
    ]
    for r in runs:
        r["class_names"] = ["tee", "trouser", "bag"]
    out = build_report(_write_runs(tmp_path, runs), _outputs(tmp_path / "rep"), "t")
    (dp,) = [r for r in summarize(load_runs(_write_runs(tmp_path / "b", runs))) if r.private]
    assert dp.median_wall_time_s == pytest.approx(5.0)  # median of 4, 6, 5
    assert dp.probe == "nonprivate_logistic"  # the logistic probe, not the best baseline
    assert dp.gap_to_probe_pp == pytest.approx(15.0)  # 95 - 80 (median seed)
    rows = list(csv.DictReader(open(out["per_class"])))
    dp_rows = [r for r in rows if r["method"] == "dp_ls"]
    assert [r["seed"] for r in dp_rows] == ["1"] * 3  # the best seed only
    assert [r["class"] for r in dp_rows] == ["tee", "trouser", "bag"]
    assert all(float(r["test_accuracy"]) == pytest.approx(0.9) for r in dp_rows)
    assert {r["method"] for r in rows} == {"dp_ls", "nonprivate_logistic", "nonprivate_ridge"}
    assert out["confusion"].stat().st_size > 10_000
    md = out["md"].read_text()
    assert "Gap to probe (pp)" in md and "| 15.00 |" in md and "per_class.csv" in md
    assert "not covered by the privacy guarantee" in md


def test_epsilon_axes_have_plain_labels_and_no_minor_labels(tmp_path):
    rows = summarize([_dp_run(epsilon=e, seed=0) for e in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)])
    fig = plot_accuracy_vs_epsilon(rows, tmp_path / "a.png")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["0.25", "0.5", "1", "2", "4", "8"]
    assert [t.get_text() for t in ax.get_xticklabels(minor=True)] in ([], [""] * 0)


def test_ledger_composes_subsets_of_the_same_data_together():
    from pipeline_lib.privacy.events import dp_ls_event, event_to_json
    from pipeline_lib.privacy.ledger import compose_ledger

    src = "/data/train-images.gz, /data/train-labels.gz [train]"
    event = event_to_json(dp_ls_event(5.0, 1.0))
    runs = [
        _dp_run(dataset="fm", data_source=src, dp_event_json=event),
        _dp_run(dataset="fm_subset", data_source=src, dp_event_json=event, seed=1),
        _dp_run(dataset="other", data_source="/other [train]", dp_event_json=event),
    ]
    rows = compose_ledger(runs)
    assert [(r.dataset, r.num_releases) for r in rows] == [("fm, fm_subset", 2), ("other", 1)]
    assert rows[0].data_source == src
