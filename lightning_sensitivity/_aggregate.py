"""Streaming, on-device statistics of per-sample sensitivities, one row per target.

State per target (``K`` targets, ``NB`` buckets)::

    count, nonfinite [K] int64      sum, abs_sum, sum_squares [K] float64      min, max [K] float64
    buckets [K, NB] int64

(``dtype=torch.float32`` makes the float64 states float32, for devices without float64 such as MPS.)

Memory is fixed by ``K`` and ``NB``, not by the number of samples. Bucket edges do not depend on the data
(logarithmic on each side of zero with a fixed relative width, as in DDSketch and HdrHistogram, plus a
bucket for zero), so the states of several processes merge by a plain sum; torchmetrics does that sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric

#: The buckets cover magnitudes 2**-EXPONENT_RANGE .. 2**EXPONENT_RANGE; smaller and larger finite magnitudes
#: fall into the innermost and outermost buckets (min and max stay exact).
EXPONENT_RANGE = 64


@dataclass(frozen=True)
class Histogram:
    """One target's statistics, on the host, ready for ``SummaryWriter.add_histogram_raw``."""

    num: int
    nonfinite: int
    sum: float
    abs_sum: float
    sum_squares: float
    min: float
    max: float
    bucket_limits: list[float]
    bucket_counts: list[int]


class SensitivityAggregator(Metric):
    """Exact count, sum, sum of |value|, sum of squares, min, max, non-finite count and bucket counts.

    ``update(values)`` takes ``values [K, N]``: ``N`` new values for each of the ``K`` targets. Non-finite
    values are counted in ``nonfinite`` and left out of everything else. Nothing is copied to the host until
    :meth:`histograms`.

    Args:
        num_targets: ``K``, the number of rows.
        buckets_per_octave: buckets per factor of two on each side of zero; a bucket spans a relative width
            of ``2 ** (1 / buckets_per_octave)``.
        dtype: dtype of the sums, min and max.

    Example:
        >>> agg = SensitivityAggregator(num_targets=1, buckets_per_octave=1)
        >>> agg.update(torch.tensor([[0.0, 1.5, -3.0, float("nan")]]))
        >>> h = agg.histograms()[0]
        >>> h.num, h.nonfinite, h.sum, h.sum_squares, h.min, h.max
        (3, 1, -1.5, 11.25, -3.0, 1.5)
        >>> [(limit, count) for limit, count in zip(h.bucket_limits, h.bucket_counts) if abs(limit) > 1e-3]
        [(-4.0, 0), (-2.0, 1), (1.0, 0), (2.0, 1)]
        >>> h.bucket_counts
        [0, 1, 0, 1, 0, 1]
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    count: Tensor
    nonfinite: Tensor
    sum: Tensor
    abs_sum: Tensor
    sum_squares: Tensor
    min: Tensor
    max: Tensor
    buckets: Tensor

    def __init__(
        self, num_targets: int, buckets_per_octave: int = 8, dtype: torch.dtype = torch.float64, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if num_targets < 1:
            raise ValueError(f"SensitivityAggregator: num_targets must be positive; got {num_targets}.")
        if buckets_per_octave < 1:
            raise ValueError(f"SensitivityAggregator: buckets_per_octave must be positive; got {buckets_per_octave}.")
        self.num_targets = num_targets
        self.buckets_per_octave = buckets_per_octave
        #: buckets on each side of zero; the layout is [negative side, zero, positive side]
        self.side = 2 * EXPONENT_RANGE * buckets_per_octave
        k = num_targets
        self.add_state("count", torch.zeros(k, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("nonfinite", torch.zeros(k, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("sum", torch.zeros(k, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("abs_sum", torch.zeros(k, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("sum_squares", torch.zeros(k, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("min", torch.full((k,), math.inf, dtype=dtype), dist_reduce_fx="min")
        self.add_state("max", torch.full((k,), -math.inf, dtype=dtype), dist_reduce_fx="max")
        self.add_state("buckets", torch.zeros(k, 2 * self.side + 1, dtype=torch.long), dist_reduce_fx="sum")

    def bucket_index(self, values: Tensor) -> Tensor:
        """Bucket of each finite value (same shape, int64): negative side, then zero, then positive side."""
        magnitude = values.abs().to(self.sum.dtype)
        exponent = torch.floor(torch.log2(magnitude) * self.buckets_per_octave)
        low = -EXPONENT_RANGE * self.buckets_per_octave
        offset = (exponent.clamp(low, -low - 1) - low).long()  # 0 .. side-1, larger magnitudes further out
        index = torch.where(values > 0, self.side + 1 + offset, self.side - 1 - offset)
        return torch.where(values == 0, torch.full_like(index, self.side), index)

    def bucket_limits(self) -> Tensor:
        """Upper edge of every bucket, increasing, ``[2 * side + 1]`` float64 on the host."""
        ppo = self.buckets_per_octave
        exponents = torch.arange(-EXPONENT_RANGE * ppo, EXPONENT_RANGE * ppo, dtype=torch.float64)
        lower = torch.exp2(exponents / ppo)  # positive bucket j covers [lower[j], lower[j] * 2**(1/ppo))
        upper = torch.exp2((exponents + 1) / ppo)
        return torch.cat([-lower.flip(0), torch.zeros(1, dtype=torch.float64), upper])

    def update(self, values: Tensor) -> None:
        """Add ``values [K, N]``."""
        if values.dim() != 2 or values.shape[0] != self.num_targets:
            raise ValueError(
                f"SensitivityAggregator.update: expected values of shape [{self.num_targets}, N]; "
                f"got {tuple(values.shape)}."
            )
        if values.shape[1] == 0:
            return
        values = values.detach().to(self.sum.dtype)
        finite = torch.isfinite(values)
        clean = torch.where(finite, values, torch.zeros((), dtype=values.dtype, device=values.device))
        self.count += finite.sum(1)
        self.nonfinite += (~finite).sum(1)
        self.sum += clean.sum(1)
        self.abs_sum += clean.abs().sum(1)
        self.sum_squares += (clean * clean).sum(1)
        inf = torch.full((), math.inf, dtype=values.dtype, device=values.device)
        self.min = torch.minimum(self.min, torch.where(finite, values, inf).amin(1))
        self.max = torch.maximum(self.max, torch.where(finite, values, -inf).amax(1))
        self.buckets.scatter_add_(1, self.bucket_index(clean), finite.long())

    def compute(self) -> dict[str, Tensor]:
        """The state, reduced over every process, and summary scalars, each ``[K]`` (``buckets`` ``[K, NB]``)
        on the metric's device: the state's fields plus ``mean``, ``std`` (with Bessel's correction, as
        ``torch.std``) and ``abs_mean``; NaN where a target has no finite value. Under DDP every rank must call
        it; the reduced state lives only in what it returns."""
        n = self.count.to(self.sum.dtype)
        mean = self.sum / n
        var = ((self.sum_squares - self.sum * mean) / (n - 1)).clamp_min(0)
        state = {name: getattr(self, name) for name in _STATE}
        return {**state, "mean": mean, "std": var.sqrt(), "abs_mean": self.abs_sum / n}

    def histograms(self, summary: dict[str, Tensor] | None = None) -> list[Histogram]:
        """Every target's statistics on the host, from ``summary`` (the result of :meth:`compute`; computed
        here when not given), without the empty buckets that carry no edge."""
        summary = self.compute() if summary is None else summary
        limits = self.bucket_limits()
        k = self.num_targets
        # one copy to the host; torchmetrics squeezes one-element results, hence the reshapes
        host = {name: summary[name].cpu().reshape(k, -1) for name in _STATE}
        out = []
        for row in range(k):
            counts = host["buckets"][row]
            # Keep every filled bucket and the empty bucket just below each, so every filled bucket keeps its
            # lower edge; runs of empty buckets between them merge into that one.
            filled = counts > 0
            keep = filled | torch.cat([filled[1:], torch.zeros(1, dtype=torch.bool)])
            scalar = {name: host[name][row, 0] for name in _STATE if name != "buckets"}
            out.append(
                Histogram(
                    num=int(scalar["count"]),
                    nonfinite=int(scalar["nonfinite"]),
                    sum=float(scalar["sum"]),
                    abs_sum=float(scalar["abs_sum"]),
                    sum_squares=float(scalar["sum_squares"]),
                    min=float(scalar["min"]),
                    max=float(scalar["max"]),
                    bucket_limits=limits[keep].tolist(),
                    bucket_counts=counts[keep].tolist(),
                )
            )
        return out


_STATE = ("count", "nonfinite", "sum", "abs_sum", "sum_squares", "min", "max", "buckets")
