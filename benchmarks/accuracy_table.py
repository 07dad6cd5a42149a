"""The method x epsilon accuracy table of one or more reports, with "ε covers tuning".

Reads the `summary.csv` that the workflow writes for each experiment
(results/reports/<experiment>/summary.csv) and prints one Markdown table: a row per
(experiment, feature setting, method), a column per target epsilon, the median test accuracy
over seeds with its min-max, and whether epsilon covers every choice made with the private
data. Non-private baselines are listed under the table as the probes of each feature set.

    python benchmarks/accuracy_table.py results/reports/*/summary.csv [--epsilons 1 3]
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict

LABELS = {
    "dp_ls": "DP-LS",
    "dp_newton": "DP-Newton",
    "dp_fc": "DP-FC",
    "dp_sgd": "DP-SGD",
    "nonprivate_ridge": "ridge (non-private)",
    "nonprivate_logistic": "logistic (non-private)",
}


def _pct(value: str) -> str:
    return f"{100 * float(value):.2f}"


def table(paths: list[str], epsilons: list[float] | None = None) -> str:
    cells: dict[tuple, dict[float, str]] = defaultdict(dict)
    covers: dict[tuple, set[str]] = defaultdict(set)
    probes: dict[tuple, str] = {}
    seen_eps: set[float] = set()
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("reproducible_noise") == "True":
                    continue  # NOT DP: never in an accuracy-vs-privacy table
                key = (row["experiment"], row["setting"], row["method"])
                if row["private"] != "true":
                    probes[(row["setting"], row["method"])] = _pct(row["median_test_accuracy"])
                    continue
                eps = float(row["target_epsilon"])
                if epsilons and not any(abs(eps - e) < 1e-9 for e in epsilons):
                    continue
                seen_eps.add(eps)
                cells[key][eps] = (
                    f"{_pct(row['median_test_accuracy'])} "
                    f"({_pct(row['min_test_accuracy'])}–{_pct(row['max_test_accuracy'])})"
                )
                covers[key].add("yes" if row["covers_tuning"] == "True" else "no")
    cols = sorted(seen_eps)
    lines = [
        "| experiment | features | method | ε covers tuning | "
        + " | ".join(f"ε = {e:g}" for e in cols)
        + " |",
        "|---|---|---|---|" + "---:|" * len(cols),
    ]
    # honest rows (epsilon covers tuning) first
    order = sorted(cells, key=lambda k: ("yes" not in covers[k], k))
    for key in order:
        exp, setting, method = key
        cover = "/".join(sorted(covers[key]))
        row = [cells[key].get(e, "") for e in cols]
        lines.append(
            f"| {exp} | {setting} | {LABELS.get(method, method)} | {cover} | "
            + " | ".join(row)
            + " |"
        )
    if probes:
        lines += ["", "| features | non-private probe | test accuracy (%) |", "|---|---|---:|"]
        for (setting, method), acc in sorted(probes.items()):
            lines.append(f"| {setting} | {LABELS.get(method, method)} | {acc} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="+", help="summary.csv files of the workflow's reports")
    parser.add_argument("--epsilons", type=float, nargs="*")
    args = parser.parse_args(argv)
    print(table(args.summaries, args.epsilons))


if __name__ == "__main__":
    main()
