"""One epoch's statistics as people read them: per-target numbers and their ranking, the correlation of the
targets, profiles along the output, and a Markdown table.

The callback builds a :class:`Report` once per logged epoch (one copy of the reduced state to the host) and
hands it to the sinks (``_sinks.py``) and the figures (``_figures.py``). Nothing here touches the engine or
the aggregators.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_sensitivity._aggregate import Histogram, collinearity, correlation
from lightning_sensitivity._identify import covariance, estimate_correlation, fisher, identifiability

#: The per-target numbers of :meth:`SensitivityMonitor.summary` that come from the aggregator.
STATS = ("count", "nonfinite", "mean", "std", "abs_mean", "mean_square", "min", "max", "rank")
#: The scalars logged per target through ``pl_module.log`` (and ``stderr`` where ``noise_std`` is set).
SCALARS = ("mean", "std", "abs_mean", "mean_square", "nonfinite")


@dataclass
class Report:
    """One logged epoch, on the host.

    Attributes:
        step: ``trainer.global_step`` when it was logged.
        labels: the targets' canonical labels, in order.
        stats: ``{label: {"count", "nonfinite", "mean", "std", "abs_mean", "mean_square", "min", "max",
            "rank"}}`` as Python numbers; ``rank`` 1 is the largest ``abs_mean`` (Morris' μ*).
        correlation: Pearson correlation of the targets' values, ``[K, K]`` float64.
        collinearity: the collinearity index of the set of targets (1 for orthogonal sensitivities).
        histograms: one per target.
        profiles: ``{dataloader_idx: {label: {"mean": Tensor[*out], "abs_mean": Tensor[*out]}}}``.
        information: ``Σ s sᵀ`` of the raw ``dy/dθ`` over the values where all are finite, ``[K, K]`` float64.
        information_count: how many values it sums.
        theta: the targets' values, ``[K]`` float64.
        noise_std: σ of the observation noise, where the monitor was given one (``stats`` then hold ``stderr``).
        products: ``SᵀS`` of the aggregated values, ``[K, K]`` float64 (the collinearity indices' source).
    """

    step: int
    labels: list[str]
    stats: dict[str, dict[str, float]]
    correlation: Tensor
    collinearity: float
    histograms: list[Histogram]
    profiles: dict[int, dict[str, dict[str, Tensor]]] = field(default_factory=dict)
    information: Tensor | None = None
    information_count: int = 0
    theta: Tensor | None = None
    noise_std: float | None = None
    products: Tensor | None = None

    def fisher(self, noise_std: float | None = None) -> Tensor:
        """``F = Σ s sᵀ / σ²`` with σ = ``noise_std``, else the report's, else 1."""
        sigma = noise_std if noise_std is not None else self.noise_std if self.noise_std is not None else 1.0
        return fisher(self._information(), sigma)

    def covariance(self, noise_std: float | None = None) -> Tensor:
        """The inverse of :meth:`fisher`, ``inf`` in the rows and columns of unbounded targets."""
        return covariance(self.fisher(noise_std))[0]

    @functools.cached_property
    def identifiability(self) -> dict[str, Any]:
        """The identifiability report of ``_identify.identifiability`` (independent of σ)."""
        return self.identifiability_of(self.labels)

    def identifiability_of(self, labels: Sequence[str]) -> dict[str, Any]:
        """The identifiability report of the targets ``labels`` alone, the others held fixed."""
        assert self.products is not None and self.theta is not None
        index = [self.labels.index(label) for label in labels]
        f = self.fisher(1.0)[index][:, index]
        report = identifiability(labels, f, self.products[index][:, index], self.theta[index])
        report["estimate_correlation"] = estimate_correlation(covariance(f)[0])
        return report

    def _information(self) -> Tensor:
        if self.information is None:
            raise RuntimeError("this report holds no information matrix")
        return self.information

    def ranked(self) -> list[str]:
        """Labels from rank 1 down."""
        return sorted(self.labels, key=lambda label: self.stats[label]["rank"])


def build_report(
    step: int,
    labels: Sequence[str],
    state: dict[str, Tensor],
    histograms: list[Histogram],
    profiles: dict[int, tuple[Tensor, Tensor]],
    theta: Tensor | None = None,
    noise_std: float | None = None,
) -> Report:
    """A :class:`Report` from the aggregator's reduced state on the host (``SensitivityAggregator.compute``,
    moved to the CPU), the profiles' means (``ProfileAggregator.profiles``) per dataloader, the targets' values
    ``theta`` and σ (``noise_std``, for the standard errors)."""
    k = len(labels)
    rows = {name: state[name].reshape(k, -1)[:, 0].tolist() for name in STATS if name != "rank"}
    order = sorted(range(k), key=lambda i: (_descending(rows["abs_mean"][i]), i))
    rank = {i: position + 1 for position, i in enumerate(order)}
    stats = {}
    for i, label in enumerate(labels):
        entry: dict[str, float] = {name: float(rows[name][i]) for name in rows}
        entry["count"], entry["nonfinite"], entry["rank"] = int(rows["count"][i]), int(rows["nonfinite"][i]), rank[i]
        if entry["count"] == 0:  # no finite value: the running min and max are still at +inf and -inf
            entry["min"] = entry["max"] = math.nan
        stats[label] = entry
    products = state["products"].reshape(k, k).to(torch.float64)
    corr = correlation(products, state["product_sum"].reshape(k).to(torch.float64), state["product_count"])
    by_loader = {
        idx: {label: {"mean": mean[i], "abs_mean": abs_mean[i]} for i, label in enumerate(labels)}
        for idx, (mean, abs_mean) in sorted(profiles.items())
    }
    information = state["information"].reshape(k, k).to(torch.float64)
    theta = torch.full((k,), math.nan, dtype=torch.float64) if theta is None else theta.to(torch.float64).cpu()
    report = Report(
        step,
        list(labels),
        stats,
        corr,
        float(collinearity(products)),
        histograms,
        by_loader,
        information=information,
        information_count=int(state["information_count"].reshape(-1)[0]),
        theta=theta,
        noise_std=noise_std,
        products=products,
    )
    errors = report.covariance().diagonal().sqrt().tolist() if noise_std is not None else [math.nan] * k
    for label, error in zip(labels, errors, strict=True):
        stats[label]["stderr"] = error
    return report


def _descending(value: float) -> float:
    return math.inf if math.isnan(value) else -value


def markdown(report: Report, prefix: str) -> str:
    """The ranked table of targets, for TensorBoard's text tab. Short columns, so that it does not wrap inside a
    word in a window 1400 px wide: ``#`` (the rank), target, μ*, σ, mean, ν, min, max; the count of values and of
    non-finite values are in a column only where they differ between targets (otherwise in the line above).

    Example:
        >>> stats = {"count": 4, "nonfinite": 0, "mean": 1.0, "std": 0.5, "abs_mean": 1.0, "mean_square": 1.25,
        ...          "min": 0.5, "max": 1.5, "rank": 1}
        >>> report = Report(3, ["k"], {"k": stats}, torch.ones(1, 1), 1.0, [])
        >>> print(markdown(report, "sensitivity").splitlines()[-1])
        | 1 | `k` | 1 | 0.5 | 1 | 1.25 | 0.5 | 1.5 |
    """
    ranked = report.ranked()
    columns = ["abs_mean", "std", "mean", "mean_square", "min", "max"]
    headers = ["#", "target", "μ\\*", "σ", "mean", "ν", "min", "max"]
    each = []
    for name, header, what in (("count", "n", "values"), ("nonfinite", "nonfinite", "non-finite")):
        values = {report.stats[label][name] for label in ranked}
        if len(values) > 1:
            columns.append(name)
            headers.append(header)
        else:
            each.append(f"{values.pop()} {what}")
    targets = f"{len(ranked)} target{'s' if len(ranked) > 1 else ''}"
    counts = " and ".join(each) + " each; " if each else ""
    lines = [
        f"**{prefix}** at step {report.step}: {targets} ranked by μ\\* = mean \\|dy/dθ\\|; σ = std, ν = mean square; "
        f"{counts}collinearity index {_number(report.collinearity)} (> 10–15: poorly identifiable).",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ]
    for label in ranked:
        s = report.stats[label]
        numbers = " | ".join(_number(s[name]) for name in columns)
        lines.append(f"| {s['rank']} | `{label}` | {numbers} |")
    return "\n".join(lines)


def _number(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.4g}"


#: Beyond this many targets the identifiability report is not written at every epoch (its eigenproblems grow
#: as K³); ``SensitivityMonitor.identifiability()`` still gives it.
MAX_REPORTED = 512


def identifiability_markdown(report: Report, prefix: str) -> str:
    """The identifiability verdicts and the least determined directions, for TensorBoard's text tab."""
    k = len(report.labels)
    head = f"**{prefix}** at step {report.step}: identifiability of {k} target{'s' if k > 1 else ''}"
    if k > MAX_REPORTED:
        return f"{head}: not written for more than {MAX_REPORTED} targets; call monitor.identifiability()."
    found = report.identifiability
    lines = [head + ".", ""] + [f"- {verdict}" for verdict in found["verdicts"]]
    values, vectors = found["eigenvalues"], found["eigenvectors"]
    lines += ["", "Least determined directions (eigenvalues of the relative information D F D, D = diag(θ)):", ""]
    lines += ["| eigenvalue | main components |", "|---|---|"]
    for n in range(min(k, 3)):
        column = vectors[:, n]
        order = column.abs().argsort(descending=True)[:4].tolist()
        parts = ", ".join(f"`{report.labels[i]}` {float(column[i]):+.2f}" for i in order if abs(column[i]) > 0.05)
        lines.append(f"| {_number(float(values[n]))} | {parts} |")
    return "\n".join(lines)
