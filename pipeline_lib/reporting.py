"""Turn per-run metrics.json files into accuracy-vs-epsilon tables and a plot.

Rules the report enforces (see DESIGN.md, "Reports"):

* Non-private numbers are always labelled "non-private"; they never appear
  with an epsilon.
* Every DP number carries its (epsilon, delta) and accountant.
* Medians and spreads are over seeds; one row per (experiment, method,
  private, target epsilon, target delta, accountant).
* A report never overstates privacy: a private run whose spent epsilon
  (or delta) exceeds its target is rejected, not summarized.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline_lib.run_contract import MetricsError, RunRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "MetricsError",
    "SummaryRow",
    "build_index",
    "build_report",
    "terminal_summary",
    "load_runs",
    "plot_accuracy_vs_epsilon",
    "summarize",
    "write_summary_csv",
    "write_summary_md",
]

# The kinds of output of one experiment's report (their paths: experiments.run_patterns).
REPORT_KINDS = ("csv", "md", "runs", "png", "per_class", "confusion")
# What summary.md written alone (write_summary_md) calls the files it points to.
DEFAULT_SIBLINGS = {"per_class": "per_class.csv", "confusion": "confusion.png"}


# What every report states about the guarantee (summary.md, index.md; the HTML report's
# front page says the same in workflow/report/workflow.rst).
PRIVACY_SCOPE = (
    "**What the guarantee covers.** Each DP row is (ε, δ)-differentially private under "
    "add-or-remove-one example, as computed by dp_accounting for the noise actually "
    "added, for the released head weights (head.npz) and, for tuned rows, the noisy "
    "validation scores. The noise of every job comes from a secret 64-bit key drawn "
    "from the operating system's cryptographic randomness and never written anywhere; "
    "a rerun of a job is a new release, which composes with the old one if both are "
    "published.",
    "**Treated as public** (the usual convention; under add-or-remove-one they differ "
    "between neighbours): the exact training-set size N, the validation size of tuned "
    "runs, and the sampling rate q = B/N.",
    "**Not covered.** Test-set accuracies (evaluated on the test split, not privately); "
    "the non-private baselines, which are computed from the same private training split, "
    "so publishing them is outside every guarantee (drop them with `baselines: {}` for "
    "a release-ready report); the choice of hyperparameters of rows whose ε does not "
    "cover tuning; and the pre-trained backbone, which saw only public data.",
    "**Not protected against.** Floating-point and timing side channels of the Gaussian "
    "and Bernoulli samplers (Mironov, CCS 2012; Jin et al., IEEE S&P 2022).",
)
REPRODUCIBLE_WARNING = (
    "**Rows marked 'NOT DP: reproducible noise' are NOT differentially private**: their "
    "noise can be regenerated from the config (noise mode 'reproducible', for tests and "
    "debugging). They are kept apart from the DP rows and left out of the privacy ledger."
)


def is_reproducible(run: Mapping[str, Any]) -> bool:
    """A DP-method run whose noise anyone can regenerate (noise mode 'reproducible')."""
    return bool(run.get("private")) and (run.get("noise") or {}).get("mode") == "reproducible"


# --- loading and validation (the checks are RunRecord.from_json's) ---------------------


def load_runs(paths: Iterable[str | os.PathLike]) -> list[RunRecord]:
    """Read and validate metrics.json files, one `RunRecord` each.

    Each record reads as the file's content plus ``"metrics_path"`` (the file it
    came from), so later errors can name it.

    Raises:
      FileNotFoundError: a file does not exist.
      MetricsError: bad JSON, a missing or ill-typed key, a private run whose spent
        epsilon or delta exceeds its target, a non-private run that carries a
        privacy budget, or the same (group, seed) twice. The message names the file.
    """
    runs = []
    seen: dict[tuple, str] = {}
    for raw_path in paths:
        path = os.fspath(raw_path)
        with open(path, "rb") as f:
            data = f.read()
        try:
            run = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise MetricsError(
                f"{path}: not valid UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from exc
        except json.JSONDecodeError as exc:
            raise MetricsError(
                f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
            ) from exc
        run = RunRecord.from_json(run, path, metrics_path=path)
        identity = (*_group_key(run), run.seed)
        if identity in seen:
            raise MetricsError(
                f"{path}: duplicate run: {seen[identity]} has the same experiment, method, "
                f"privacy parameters and seed {run.seed}; each seed must count once"
            )
        seen[identity] = path
        runs.append(run)
    return runs


# --- summarizing -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class SummaryRow:
    """Test accuracy of one configuration over seeds (accuracies are fractions in [0, 1])."""

    experiment: str
    method: str
    private: bool
    target_epsilon: float | None
    target_delta: float | None
    accountant: str | None
    neighboring_relation: str | None
    n_seeds: int
    seeds: tuple[int, ...]
    median_test_accuracy: float
    min_test_accuracy: float
    max_test_accuracy: float
    spread_test_accuracy: float  # max - min over seeds
    median_spent_epsilon: float | None
    noise_multipliers: Mapping[str, float]  # median over seeds, per release name
    setting: str = ""  # "dataset/backbone/<size>px" (empty for runs that do not say)
    covers_tuning: bool | None = None  # True: target epsilon covers hyperparameter selection
    median_per_run_epsilon: float | None = None  # tuned runs: the selected candidate alone
    reproducible_noise: bool = False  # True: NOT differentially private (noise regenerable)
    median_wall_time_s: float | None = None  # calibrate + fit + evaluate, median over seeds
    gap_to_probe_pp: float | None = None  # probe's median accuracy minus this row's, in points
    probe: str | None = None  # the non-private baseline the gap is measured against

    @property
    def display_method(self) -> str:
        """The method, marked when its epsilon covers a hyperparameter search, and marked
        NOT DP when its noise is reproducible."""
        name = f"{self.method} (tuned, ε covers tuning)" if self.covers_tuning else self.method
        return f"{name} [NOT DP: reproducible noise]" if self.reproducible_noise else name

    @property
    def privacy_label(self) -> str:
        """The row's privacy in words: 'non-private', or '(ε, δ) = (1, 1e-05), pld'."""
        if not self.private:
            return "non-private"
        budget = (
            f"(ε, δ) = ({_fmt(self.target_epsilon)}, {_fmt(self.target_delta)}), {self.accountant}"
        )
        if self.reproducible_noise:
            return f"NOT DP: reproducible noise (calibrated for {budget})"
        return budget


def run_setting(run: Mapping[str, Any]) -> str:
    """ "dataset/backbone/<size>px" of a run, or "" when the metrics do not say."""
    parts = [run.get("dataset"), run.get("backbone")]
    if run.get("image_size") is not None:
        parts.append(f"{run['image_size']}px")
    return "/".join(str(p) for p in parts if p is not None)


def _group_key(run: Mapping[str, Any]) -> tuple:
    return (
        run["experiment"],
        run["method"],
        run["private"],
        run["target_epsilon"],
        run["target_delta"],
        run["accountant"],
        run_setting(run),
        run.get("epsilon_covers_tuning"),
        is_reproducible(run),
    )


def _sort_key(row: SummaryRow) -> tuple:
    inf = math.inf
    return (
        row.reproducible_noise,  # NOT-DP rows after every DP row and baseline
        row.method,
        bool(row.covers_tuning),
        inf if row.target_epsilon is None else row.target_epsilon,
        row.setting,
        row.experiment,
        inf if row.target_delta is None else row.target_delta,
        row.accountant or "",
    )


def summarize(runs: Iterable[Mapping[str, Any]]) -> list[SummaryRow]:
    """Group runs by (experiment, method, private, target ε, target δ, accountant).

    Runs must already be validated (see :func:`load_runs`). Returns one row per
    group, sorted by method, then target epsilon (non-private last), then experiment.

    Raises:
      ValueError: no runs, or runs of one group disagree on the neighbouring relation.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault(_group_key(run), []).append(run)
    if not groups:
        raise ValueError("no runs to summarize")

    rows = []
    for key, members in groups.items():
        experiment, method, private, target_epsilon, target_delta, accountant = key[:6]
        setting, covers_tuning, reproducible = key[6:]
        relations = {run.get("neighboring_relation") for run in members}
        if private and len(relations) > 1:
            files = ", ".join(str(run.get("metrics_path", "?")) for run in members)
            raise ValueError(
                f"{experiment}/{method} at epsilon {target_epsilon}: runs disagree on the "
                f"neighbouring relation {sorted(map(str, relations))} ({files})"
            )
        accuracies = [float(run["test_accuracy"]) for run in members]
        names = sorted({name for run in members for name in run["noise_multipliers"]})
        multipliers = {
            name: statistics.median(
                float(run["noise_multipliers"][name])
                for run in members
                if name in run["noise_multipliers"]
            )
            for name in names
        }
        rows.append(
            SummaryRow(
                experiment=experiment,
                method=method,
                private=private,
                target_epsilon=target_epsilon,
                target_delta=target_delta,
                accountant=accountant,
                neighboring_relation=relations.pop() if len(relations) == 1 else None,
                n_seeds=len(members),
                seeds=tuple(sorted(run["seed"] for run in members)),
                median_test_accuracy=statistics.median(accuracies),
                min_test_accuracy=min(accuracies),
                max_test_accuracy=max(accuracies),
                spread_test_accuracy=max(accuracies) - min(accuracies),
                median_spent_epsilon=(
                    statistics.median(float(run["spent_epsilon"]) for run in members)
                    if private
                    else None
                ),
                noise_multipliers=multipliers,
                setting=setting,
                covers_tuning=covers_tuning,
                reproducible_noise=reproducible,
                median_wall_time_s=_median_time(members),
                median_per_run_epsilon=(
                    statistics.median(
                        float(run.get("per_run_epsilon") or run["spent_epsilon"]) for run in members
                    )
                    if private
                    else None
                ),
            )
        )
    return sorted(_with_gaps(rows), key=_sort_key)


PROBE = "nonprivate_logistic"  # the non-private probe the gaps are measured against


def _median_time(members: Sequence[Mapping[str, Any]]) -> float | None:
    times = [sum(float(v) for v in (r.get("timings_s") or {}).values()) for r in members]
    times = [t for t in times if t > 0]
    return statistics.median(times) if times else None


def _with_gaps(rows: list[SummaryRow]) -> list[SummaryRow]:
    """Each row's gap, in points, to the non-private probe of its experiment and setting
    (``nonprivate_logistic``, else the best baseline there)."""
    probes: dict[tuple, SummaryRow] = {}
    for row in rows:
        if row.private:
            continue
        key = (row.experiment, row.setting)
        old = probes.get(key)
        if (
            old is None
            or (row.method == PROBE) > (old.method == PROBE)
            or (
                (row.method == PROBE) == (old.method == PROBE)
                and row.median_test_accuracy > old.median_test_accuracy
            )
        ):
            probes[key] = row
    out = []
    for row in rows:
        probe = probes.get((row.experiment, row.setting))
        if probe is None or probe is row:
            out.append(row)
            continue
        gap = 100 * (probe.median_test_accuracy - row.median_test_accuracy)
        out.append(dataclasses.replace(row, gap_to_probe_pp=gap, probe=probe.method))
    return out


# --- writing -------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    """Short human form of a budget: 1, 0.25, 1e-05."""
    return "" if value is None else f"{value:g}"


def _num(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _pct(fraction: float | None) -> str:
    return "" if fraction is None else f"{100 * fraction:.2f}%"


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _csv_columns(rows: Sequence[SummaryRow]) -> list[str]:
    names = sorted({name for row in rows for name in row.noise_multipliers})
    return [
        "experiment",
        "method",
        "private",
        "privacy",
        "target_epsilon",
        "target_delta",
        "accountant",
        "neighboring_relation",
        "n_seeds",
        "seeds",
        "median_test_accuracy",
        "min_test_accuracy",
        "max_test_accuracy",
        "spread_test_accuracy",
        "median_spent_epsilon",
        "setting",
        "covers_tuning",
        "median_per_run_epsilon",
        "reproducible_noise",
        "median_wall_time_s",
        "gap_to_probe_pp",
        "probe",
        *(f"noise_multiplier_{name}" for name in names),
    ]


def _write_csv(rows: Sequence[SummaryRow], path: Path) -> None:
    columns = _csv_columns(rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            record = {
                field.name: getattr(row, field.name)
                for field in dataclasses.fields(row)
                if field.name != "noise_multipliers"
            }
            record["privacy"] = row.privacy_label
            record["private"] = "true" if row.private else "false"
            record["seeds"] = ";".join(str(seed) for seed in row.seeds)
            for name, value in row.noise_multipliers.items():
                record[f"noise_multiplier_{name}"] = value
            writer.writerow({k: ("" if v is None else v) for k, v in record.items()})


def write_summary_csv(rows: Sequence[SummaryRow], path: str | os.PathLike) -> None:
    """Machine-readable summary: accuracies as fractions, empty cells for "not applicable"."""
    with _atomic(Path(path)) as tmp:
        _write_csv(rows, tmp)


def _dp_settings(rows: Sequence[SummaryRow]) -> set[tuple]:
    return {
        (row.target_delta, row.accountant, row.neighboring_relation) for row in rows if row.private
    }


def _settings_sentence(rows: Sequence[SummaryRow]) -> str:
    settings = _dp_settings(rows)
    if not settings:
        return "All rows are non-private baselines: they carry no privacy guarantee."
    if len(settings) == 1:
        ((delta, accountant, relation),) = settings
        return (
            f"DP rows: (ε, δ)-DP with δ = {_fmt(delta)}, accountant: {accountant}, "
            f"neighbouring relation: {relation}. Spent ε never exceeds the target ε."
        )
    return (
        "DP rows use several (δ, accountant) settings; each row states its own. "
        "Spent ε never exceeds the target ε."
    )


def _write_md(
    rows: Sequence[SummaryRow],
    path: Path,
    title: str | None,
    files: Mapping[str, str] = DEFAULT_SIBLINGS,
) -> None:
    """summary.md; ``files`` names the report's per-class table and confusion figure."""
    lines = []
    if title:
        lines += [f"# {title}", ""]
    lines += [*_scope_lines(rows), "## Results", ""]
    lines += [
        _settings_sentence(rows),
        'Rows marked "non-private" are baselines without any privacy guarantee.',
        "Accuracies are test accuracies over seeds: median, min, max, and the spread "
        "(max − min) in percentage points (pp).",
        "",
        "Tuned rows chose among a hyperparameter grid; their ε covers that choice "
        "(all candidates and the selection are accounted), and 'per-run ε' is what the "
        "selected candidate alone would cost. Other rows used hyperparameters fixed in the "
        "config; their ε does not cover how those were chosen.",
        "",
        "'Gap' is the non-private probe's median test accuracy minus the row's, in "
        "percentage points; 'Time' is the median wall time of one run (calibration, fit and "
        "evaluation).",
        "",
        "| Experiment | Data / backbone | Method | Privacy (ε, δ) | Accountant "
        "| Spent ε (median) | Per-run ε | ε covers tuning "
        "| Test acc. (median) | Min | Max | Spread (pp) | Gap to probe (pp) | Time (s) "
        "| Seeds | Noise multipliers (median) |",
        "|---|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if row.private:
            privacy = f"({_fmt(row.target_epsilon)}, {_fmt(row.target_delta)})"
            if row.reproducible_noise:
                privacy = f"NOT DP (reproducible noise; calibrated for {privacy})"
            spent = _fmt(row.median_spent_epsilon)
            accountant = row.accountant or ""
            per_run = f"{row.median_per_run_epsilon:.4g}" if row.median_per_run_epsilon else "—"
            covers = "yes" if row.covers_tuning else "no (fixed in config)"
        else:
            privacy, spent, accountant, per_run, covers = "non-private", "—", "—", "—", "—"
        multipliers = ", ".join(f"{k}={v:.4g}" for k, v in row.noise_multipliers.items()) or "—"
        lines.append(
            f"| {row.experiment} | {row.setting or '—'} | {row.display_method} | {privacy} "
            f"| {accountant} | {spent} | {per_run} | {covers} "
            f"| {_pct(row.median_test_accuracy)} | {_pct(row.min_test_accuracy)} "
            f"| {_pct(row.max_test_accuracy)} | {100 * row.spread_test_accuracy:.2f} "
            f"| {_num(row.gap_to_probe_pp, '.2f')} | {_num(row.median_wall_time_s, '.1f')} "
            f"| {row.n_seeds} | {multipliers} |"
        )
    lines += [
        "",
        f"Per-class test accuracy: {files['per_class']}; confusion matrices: {files['confusion']} "
        f"(the best seed of each method and ε). {TEST_NOTE}",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _scope_lines(rows: Sequence[SummaryRow]) -> list[str]:
    """The privacy statement every Markdown report opens with."""
    lines = ["## What the privacy guarantee covers", ""]
    lines += [f"- {text}" for text in PRIVACY_SCOPE]
    if any(row.reproducible_noise for row in rows):
        lines += ["", REPRODUCIBLE_WARNING]
    return [*lines, ""]


def write_summary_md(
    rows: Sequence[SummaryRow], path: str | os.PathLike, *, title: str | None = None
) -> None:
    """Human-readable summary table; percentages with 2 decimals."""
    with _atomic(Path(path)) as tmp:
        _write_md(rows, tmp, title)


def _errorbar(ax, members: Sequence[SummaryRow], **kwargs):
    """Median accuracy (%) against target ε with min–max error bars over seeds."""
    medians = [100 * r.median_test_accuracy for r in members]
    return ax.errorbar(
        [r.target_epsilon for r in members],
        medians,
        yerr=[
            [m - 100 * r.min_test_accuracy for m, r in zip(medians, members, strict=True)],
            [100 * r.max_test_accuracy - m for m, r in zip(medians, members, strict=True)],
        ],
        marker="o",
        **kwargs,
    )


def _epsilon_axis(ax, epsilons: Sequence[float]) -> None:
    """Log x axis with one plain-number tick per budget that was run and no minor labels
    (matplotlib's default minor labels like '3x10^-1' overlap into a jumble)."""
    from matplotlib.ticker import NullFormatter, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    if epsilons:
        ax.set_xticks(list(epsilons), [_fmt(eps) for eps in epsilons])
        ax.set_xlim(epsilons[0] / 1.5, epsilons[-1] * 1.5)
    else:
        ax.set_xlim(0.1, 10.0)
    ax.set_xlabel("target ε (log scale)")


def _plot(rows: Sequence[SummaryRow], path: Path, title: str) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("no summary rows to plot")
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    settings = _dp_settings(rows)
    one_setting = len(settings) <= 1

    series: dict[tuple, list[SummaryRow]] = {}
    for row in rows:
        if row.private:
            key = (
                row.experiment,
                row.display_method,
                row.target_delta,
                row.accountant,
                row.setting,
            )
            series.setdefault(key, []).append(row)
    experiments = {row.experiment for row in rows}
    settings_seen = {row.setting for row in rows if row.setting}
    handles: list[Any] = []  # legend order: DP lines, then baselines, as in the table
    for (experiment, method, delta, accountant, setting), members in series.items():
        members = sorted(members, key=lambda r: r.target_epsilon)
        label = method if len(experiments) == 1 else f"{experiment}: {method}"
        if len(settings_seen) > 1:
            label += f" [{setting}]"
        if not one_setting:
            label += f" (δ = {_fmt(delta)}, {accountant})"
        handles.append(_errorbar(ax, members, capsize=3, label=label))
    for i, row in enumerate(r for r in rows if not r.private):
        label = row.method if len(experiments) == 1 else f"{row.experiment}: {row.method}"
        if len(settings_seen) > 1:
            label += f" [{row.setting}]"
        line = ax.axhline(
            100 * row.median_test_accuracy,
            linestyle="--",
            color=f"C{(len(series) + i) % 10}",
            label=f"{label} (non-private)",
        )
        handles.append(line)

    _epsilon_axis(ax, sorted({row.target_epsilon for row in rows if row.private}))
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(handles=handles, loc="best", fontsize="small")
    if not settings:
        subtitle = "non-private baselines only"
    elif one_setting:
        ((delta, accountant, _),) = settings
        subtitle = (
            f"(ε, δ)-DP, δ = {_fmt(delta)}, accountant: {accountant}; median and min–max over seeds"
        )
    else:
        subtitle = "δ and accountant per line; median and min–max over seeds"
    ax.set_title(f"{title}\n{subtitle}", fontsize="medium")
    fig.savefig(path, format="png", dpi=120)
    return fig


def plot_accuracy_vs_epsilon(
    rows: Sequence[SummaryRow],
    path: str | os.PathLike,
    title: str = "Test accuracy vs. privacy budget",
) -> Figure:
    """PNG: median test accuracy (%) against target ε (log x), min–max error bars over
    seeds, one line per private method, and each non-private baseline as a labelled
    dashed horizontal line. The title states δ and the accountant.

    Returns the (pyplot-free) matplotlib Figure, for inspection.
    """
    with _atomic(Path(path)) as tmp:
        return _plot(rows, tmp, title)


def build_report(
    metrics_paths: Iterable[str | os.PathLike],
    outputs: Mapping[str, str | os.PathLike],
    title: str,
) -> dict[str, Path]:
    """Write one experiment's report to ``outputs``: the paths rule report_experiment
    declares, by kind (``csv``, ``md``, ``runs``, ``png``, ``per_class``, ``confusion``;
    `pipeline_lib.experiments.report_files`).

    Older outputs are removed first; then all inputs are loaded and checked; then
    each output is written under a temporary name and renamed into place only
    after all of them were written. So a failure leaves no file that looks like a
    finished report. Returns the output paths by kind.
    """
    missing = sorted(set(REPORT_KINDS) - set(outputs))
    unknown = sorted(set(outputs) - set(REPORT_KINDS))
    if missing or unknown:
        raise ValueError(
            f"build_report: outputs must be exactly {list(REPORT_KINDS)}; "
            f"missing {missing}, unknown {unknown}"
        )
    outputs = {kind: Path(outputs[kind]) for kind in REPORT_KINDS}
    for path in outputs.values():  # a stale report must not outlive a failed rebuild
        path.unlink(missing_ok=True)
    metrics_paths = list(metrics_paths)
    if not metrics_paths:
        raise ValueError("build_report: no metrics files given")
    runs = load_runs(metrics_paths)
    rows = summarize(runs)

    for path in outputs.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        tmp = {kind: stack.enter_context(_atomic(path)) for kind, path in outputs.items()}
        _write_runs_csv(runs, tmp["runs"])
        _write_csv(rows, tmp["csv"])
        _write_md(rows, tmp["md"], title, {k: outputs[k].name for k in DEFAULT_SIBLINGS})
        _plot(rows, tmp["png"], title)
        best = best_runs(runs)
        _write_per_class(best, tmp["per_class"])
        _plot_confusions(best, tmp["confusion"], title)
    return outputs


# --- per-class accuracy and confusion matrices of the best seed ----------------------

TEST_NOTE = (
    "Test-split evaluation, like every accuracy in these reports, is not covered by the "
    "privacy guarantee."
)


def best_runs(runs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The best seed (highest test accuracy) of every summary row that has a confusion
    matrix, in the summary's order: one per method and target ε (and baseline)."""
    groups: dict[tuple, Mapping[str, Any]] = {}
    for run in runs:
        if run.get("test_confusion") is None:
            continue
        key = _group_key(run)
        if key not in groups or run["test_accuracy"] > groups[key]["test_accuracy"]:
            groups[key] = run
    order = {(r.experiment, r.method, r.target_epsilon, r.setting): i for i, r in
             enumerate(summarize(list(groups.values())))} if groups else {}  # fmt: skip
    return sorted(
        groups.values(),
        key=lambda r: order[(r["experiment"], r["method"], r["target_epsilon"], run_setting(r))],
    )


def _run_label(run: Mapping[str, Any]) -> str:
    if not run["private"]:
        return f"{run['method']} (non-private)"
    label = f"{run['method']} ε={_fmt(run['target_epsilon'])}"
    if run.get("epsilon_covers_tuning"):
        label += " (tuned)"
    return label + (" NOT DP" if is_reproducible(run) else "")


def _class_names(run: Mapping[str, Any], k: int) -> list[str]:
    names = run.get("class_names")
    return [str(n) for n in names] if names and len(names) == k else [str(i) for i in range(k)]


def _write_per_class(best: Sequence[Mapping[str, Any]], path: Path) -> None:
    columns = ["experiment", "setting", "method", "privacy", "seed", "class_index", "class",
               "test_examples", "test_accuracy"]  # fmt: skip
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for run in best:
            cm = [[int(v) for v in row] for row in run["test_confusion"]]
            names = _class_names(run, len(cm))
            for k, row in enumerate(cm):
                total = sum(row)
                writer.writerow(
                    {
                        "experiment": run["experiment"],
                        "setting": run_setting(run),
                        "method": run["method"],
                        "privacy": _run_label(run),
                        "seed": run["seed"],
                        "class_index": k,
                        "class": names[k],
                        "test_examples": total,
                        "test_accuracy": "" if total == 0 else row[k] / total,
                    }
                )


def _plot_confusions(best: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """One row-normalised confusion matrix per best seed, in a grid of panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(1, len(best))
    cols = min(6, n)
    nrows = -(-n // cols)
    fig = Figure(figsize=(3.0 * cols + 0.6, 3.1 * nrows + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    if not best:
        fig.suptitle(f"{title}: no run records a confusion matrix")
    for i, run in enumerate(best):
        cm = np.asarray(run["test_confusion"], np.float64)
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax = fig.add_subplot(nrows, cols, i + 1)
        image = ax.imshow(norm, vmin=0.0, vmax=1.0, cmap="viridis")
        k = len(cm)
        names = _class_names(run, k)
        ticks = range(k)
        short = [name[:8] for name in names]
        ax.set_xticks(ticks, short if k <= 12 else [""] * k, rotation=90, fontsize=6)
        ax.set_yticks(ticks, short if k <= 12 else [""] * k, fontsize=6)
        ax.set_title(
            f"{_run_label(run)}\nseed {run['seed']}: {100 * run['test_accuracy']:.1f}%",
            fontsize=7,
        )
        if i % cols == 0:
            ax.set_ylabel("true class", fontsize=7)
        ax.set_xlabel("predicted", fontsize=7)
    if best:
        fig.colorbar(image, ax=fig.axes, shrink=0.6, label="fraction of the true class")
        fig.suptitle(
            f"{title}: confusion matrices of the best seed per method and ε (test split, "
            "not covered by the privacy guarantee)",
            fontsize=9,
        )
    fig.savefig(path, format="png", dpi=100)


# --- per-run table, cross-experiment index, privacy ledger, terminal summary -------

RUN_COLUMNS = (
    "experiment",
    "dataset",
    "backbone",
    "image_size",
    "method",
    "private",
    "seed",
    "target_epsilon",
    "spent_epsilon",
    "per_run_epsilon",
    "epsilon_covers_tuning",
    "target_delta",
    "accountant",
    "noise_mode",
    "tuning_selection",
    "selected_candidate",
    "num_candidates",
    "test_accuracy",
    "hyperparameters",
    "metrics_path",
)


def _run_row(run: Mapping[str, Any]) -> dict[str, Any]:
    tuning = run.get("tuning") or {}
    row = {key: run.get(key) for key in RUN_COLUMNS}
    row.update(
        private="true" if run["private"] else "false",
        noise_mode=(run.get("noise") or {}).get("mode"),
        tuning_selection=tuning.get("selection"),
        selected_candidate=tuning.get("selected"),
        num_candidates=tuning.get("num_candidates", 1 if run["private"] else None),
        hyperparameters=json.dumps(run.get("hyperparameters", {}), sort_keys=True),
    )
    if run.get("epsilon_covers_tuning") is not None:
        row["epsilon_covers_tuning"] = "true" if run["epsilon_covers_tuning"] else "false"
    return row


def _write_runs_csv(runs: Sequence[Mapping[str, Any]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(RUN_COLUMNS))
        writer.writeheader()
        for run in sorted(runs, key=lambda r: (r["method"], r["target_epsilon"] or 0, r["seed"])):
            writer.writerow({k: ("" if v is None else v) for k, v in _run_row(run).items()})


def _ledger_md(rows) -> list[str]:
    lines = [
        "| Dataset | Data read | Releases | Experiments | Total ε | at δ | Accountant "
        "| Largest single-run ε | Sum of run ε (basic composition) | Meaningful (δ < 1/N) |",
        "|---|---|---:|---|---:|---:|---|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.dataset} | {row.data_source or '—'} | {row.num_releases} "
            f"| {', '.join(row.experiments)} "
            f"| {row.epsilon_total:.4g} | {row.delta:.3g} | {row.accountant} "
            f"| {row.max_run_epsilon:.4g} | {row.sum_run_epsilon:.4g} "
            f"| {'yes' if row.meaningful else 'NO: δ ≥ 1/N'} |"
        )
    return lines


LEDGER_NOTE = (
    "The privacy ledger composes, per private dataset, every release the reports "
    "publish (all experiments, methods, epsilons, seeds and tuning candidates) with "
    "dp_accounting (the smaller of the PLD and RDP bounds), at the smallest δ those runs "
    "targeted. Each row's total is what "
    "publishing all of these results costs that dataset; per-run epsilons in the "
    "tables hold for one released head alone. Runs are grouped by the data they read "
    "(files or TFDS name, and split): dataset keys that name the same data, subsets "
    "included, are composed together."
)
LEDGER_OUTSIDE = (
    "**Outside this total:** the non-private baselines and every test-set accuracy. The "
    "baselines are computed from the same private training split and their accuracies "
    "are published in these reports, so they are outside any guarantee; drop them "
    "(`baselines: {}` in the experiment) for a release-ready report. Runs with "
    "reproducible noise are NOT differentially private and are not composed here."
)


def _ledger_extra(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """What the ledger leaves out, counted: baselines and reproducible-noise runs."""
    baselines = sum(1 for r in runs if not r["private"])
    reproducible = sum(1 for r in runs if is_reproducible(r))
    lines = [LEDGER_OUTSIDE, ""]
    lines.append(
        f"Published here and outside the total: {baselines} non-private baseline run(s)"
        + (f", {reproducible} run(s) with reproducible noise (NOT DP)." if reproducible else ".")
    )
    return lines


def best_per_epsilon(rows: Sequence[SummaryRow]) -> dict[tuple[str, str], list[SummaryRow]]:
    """(experiment, setting) -> the best DP row (median accuracy) at each target ε."""
    best: dict[tuple[str, str, float], SummaryRow] = {}
    for row in rows:
        if not row.private or row.reproducible_noise:
            continue
        key = (row.experiment, row.setting, row.target_epsilon)
        if key not in best or row.median_test_accuracy > best[key].median_test_accuracy:
            best[key] = row
    out: dict[tuple[str, str], list[SummaryRow]] = {}
    for (experiment, setting, _), row in sorted(best.items(), key=lambda kv: kv[0]):
        out.setdefault((experiment, setting), []).append(row)
    return out


def _index_plot(rows: Sequence[SummaryRow], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    experiments = sorted({row.experiment for row in rows})
    cols = min(3, len(experiments))
    nrows = -(-len(experiments) // cols)
    fig = Figure(figsize=(5.5 * cols, 4.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, experiment in enumerate(experiments):
        ax = fig.add_subplot(nrows, cols, i + 1)
        mine = [r for r in rows if r.experiment == experiment]
        series: dict[tuple, list[SummaryRow]] = {}
        for row in mine:
            if row.private:
                series.setdefault((row.display_method, row.setting), []).append(row)
        settings = {r.setting for r in mine if r.setting}
        for j, ((method, setting), members) in enumerate(sorted(series.items())):
            members.sort(key=lambda r: r.target_epsilon)
            label = method + (f" [{setting}]" if len(settings) > 1 else "")
            _errorbar(ax, members, capsize=2, color=f"C{j % 10}", label=label)
        for j, row in enumerate(r for r in mine if not r.private):
            ax.axhline(
                100 * row.median_test_accuracy,
                linestyle="--",
                color=f"C{(len(series) + j) % 10}",
                label=f"{row.method} (non-private)",
            )
        _epsilon_axis(ax, sorted({r.target_epsilon for r in mine if r.private}))
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(experiment, fontsize="medium")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.savefig(path, format="png", dpi=110)


def build_index(
    metrics_paths: Iterable[str | os.PathLike],
    outputs: Mapping[str, str | os.PathLike],
    *,
    descriptions: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """The cross-experiment report: index.md, ledger.csv, ledger.md, all_experiments.png.

    ``outputs`` maps "index", "ledger_csv", "ledger_md", "png" to paths. Like
    :func:`build_report`, nothing is left looking finished after a failure.
    """
    from pipeline_lib.privacy.ledger import compose_ledger

    outs = {k: Path(v) for k, v in outputs.items()}
    for path in outs.values():
        path.unlink(missing_ok=True)
    runs = load_runs(list(metrics_paths))
    rows = summarize(runs)
    ledger = compose_ledger(runs)
    descriptions = dict(descriptions or {})

    lines = [
        "# DP image classification from pre-trained features: all experiments",
        "",
        "Accuracy is test accuracy (median over seeds). Every DP number is (ε, δ)-DP under "
        "add-or-remove-one; non-private rows carry no guarantee.",
        "",
        *_scope_lines(rows),
        "## Best DP method per ε",
        "",
    ]
    for (experiment, setting), best in best_per_epsilon(rows).items():
        lines.append(f"### {experiment} ({setting or 'setting not recorded'})")
        if descriptions.get(experiment):
            lines.append(f"{descriptions[experiment]}")
        lines += [
            "",
            "| target ε | δ | best method | test acc. (median) | ε covers tuning |",
            "|---:|---:|---|---:|---|",
        ]
        for row in best:
            lines.append(
                f"| {_fmt(row.target_epsilon)} | {_fmt(row.target_delta)} | {row.method} "
                f"| {_pct(row.median_test_accuracy)} | {'yes' if row.covers_tuning else 'no'} |"
            )
        baselines = [r for r in rows if not r.private and r.experiment == experiment]
        for row in baselines:
            lines.append(
                f"| — | — | {row.method} (non-private) | {_pct(row.median_test_accuracy)} | — |"
            )
        lines += ["", f"Full table: reports/{experiment}/summary.md", ""]
    extra = _ledger_extra(runs)
    lines += ["## Privacy ledger", "", LEDGER_NOTE, "", *_ledger_md(ledger), "", *extra, ""]

    outs["index"].parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        tmp = {kind: stack.enter_context(_atomic(path)) for kind, path in outs.items()}
        tmp["index"].write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp["ledger_md"].write_text(
            "\n".join(["# Privacy ledger", "", LEDGER_NOTE, "", *_ledger_md(ledger), "", *extra])
            + "\n",
            encoding="utf-8",
        )
        with open(tmp["ledger_csv"], "w", newline="", encoding="utf-8") as f:
            fields = [f.name for f in dataclasses.fields(ledger[0])] if ledger else ["dataset"]
            writer = csv.DictWriter(f, fieldnames=[*fields, "meaningful"])
            writer.writeheader()
            for row in ledger:
                record = dataclasses.asdict(row)
                record["experiments"] = ";".join(row.experiments)
                writer.writerow({**record, "meaningful": row.meaningful})
        _index_plot(rows, tmp["png"])
    return outs


def terminal_summary(metrics_paths: Iterable[str | os.PathLike], reports_dir: str) -> str:
    """A few lines for the end of a run: the best method per ε and where the reports are."""
    rows = summarize(load_runs(list(metrics_paths)))
    lines = ["", "=== DP heads: best method per target ε (median test accuracy) ==="]
    for (experiment, setting), best in best_per_epsilon(rows).items():
        lines.append(f"{experiment} [{setting}]:")
        lines.append(
            "  "
            + "  ".join(
                f"ε={_fmt(r.target_epsilon)}: {r.display_method} {_pct(r.median_test_accuracy)}"
                for r in best
            )
        )
    lines.append(
        f"Reports: {reports_dir}/index.md (with the privacy ledger), "
        f"{reports_dir}/<experiment>/summary.md; HTML: snakemake --report report.html"
    )
    return "\n".join(lines)
