"""The privacy ledger: everything released from each private dataset, composed.

Every private run writes its whole release as a DpEvent (``dp_event_json`` in
metrics.json). Publishing all runs of all experiments that trained on one
dataset is one big adaptive composition, and its cost is what a reader of the
reports should weigh, not the per-run epsilon alone. The ledger composes, per
dataset, every released event with ``dp_accounting`` (PLD and RDP; both are
valid upper bounds, the smaller is reported) and states the total epsilon at
``delta`` = the smallest delta any of those runs targeted. Composing the
events themselves (not their (epsilon, delta) pairs) gives the privacy loss of
the whole composition, so it can be read off at any delta; the deltas do not
have to be added up as basic composition would.

Two runs never share noise (every job draws a fresh secret base key, see
``pipeline_lib.privacy.noise.NoiseKey``), which composition requires. The
ledger groups by the underlying data each run read (``data_source`` in
metrics.json: the files or TFDS name, and the split), so dataset keys that
name the same data, a subset (``max_train_examples``) included, are composed
together; runs from before that field group by dataset key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import dp_accounting

from pipeline_lib.privacy.accounting import make_accountant
from pipeline_lib.privacy.events import event_from_json

__all__ = ["LedgerRow", "compose_ledger"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LedgerRow:
    dataset: str  # the dataset key(s) whose runs read this data
    num_releases: int
    experiments: tuple[str, ...]
    delta: float  # the delta at which epsilon_total holds
    epsilon_total: float  # min over the accountants that support every event
    accountant: str  # which one gave epsilon_total
    max_run_epsilon: float
    sum_run_epsilon: float  # naive basic composition, for comparison
    num_train: int | None  # N of the dataset's training split (max over runs)
    data_source: str = ""  # the underlying data (files or TFDS name, and split)

    @property
    def meaningful(self) -> bool:
        """delta < 1/N: otherwise the total guarantee is vacuous."""
        return self.num_train is None or self.delta < 1.0 / self.num_train


def _total_epsilon(events: list, delta: float) -> tuple[float, str]:
    best = (math.inf, "none")
    for name in ("pld", "rdp"):
        accountant = make_accountant(name)
        composed = dp_accounting.ComposedDpEvent(events)
        if not accountant.supports(composed):
            continue
        accountant.compose(composed)
        eps = float(accountant.get_epsilon(delta))
        if eps < best[0]:
            best = (eps, name)
    return best


def compose_ledger(runs: Iterable[Mapping[str, Any]]) -> list[LedgerRow]:
    """One row per dataset with private runs; runs are `RunRecord`s (`reporting.load_runs`)
    or the same keys as a plain mapping."""
    by_dataset: dict[str, list[Mapping[str, Any]]] = {}
    for run in runs:
        # A run with reproducible noise is NOT DP (its noise can be regenerated from the
        # config): no accountant can bound what it leaks, so it is kept out of every total
        # and the reports list it apart.
        reproducible = (run.get("noise") or {}).get("mode") == "reproducible"
        if run.get("private") and not reproducible:
            if "dp_event_json" not in run:
                where = run.get("metrics_path", "a run")
                raise ValueError(
                    f"{where}: no dp_event_json; rerun it with this version so the "
                    "ledger can compose its release"
                )
            group = str(run.get("data_source") or run.get("dataset", "?"))
            by_dataset.setdefault(group, []).append(run)
    rows = []
    for source, members in sorted(by_dataset.items()):
        dataset = ", ".join(sorted({str(r.get("dataset", "?")) for r in members}))
        events = [event_from_json(r["dp_event_json"]) for r in members]
        delta = min(float(r["spent_delta"]) for r in members)
        eps, accountant = _total_epsilon(events, delta)
        sizes = [r.get("num_train") for r in members if r.get("num_train")]
        rows.append(
            LedgerRow(
                dataset=dataset,
                num_releases=len(members),
                experiments=tuple(sorted({str(r["experiment"]) for r in members})),
                delta=delta,
                epsilon_total=eps,
                accountant=accountant,
                max_run_epsilon=max(float(r["spent_epsilon"]) for r in members),
                sum_run_epsilon=sum(float(r["spent_epsilon"]) for r in members),
                num_train=max(sizes) if sizes else None,
                data_source=source if any(r.get("data_source") for r in members) else "",
            )
        )
    return rows
