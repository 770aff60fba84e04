"""Streaming, on-device statistics of per-sample sensitivities, one row per target.

State per target (``K`` targets, ``NB`` buckets)::

    count, nonfinite [K] int64      sum, abs_sum, sum_squares [K] float64      min, max [K] float64
    buckets [K, NB] int64
    products [K, K] float64         product_sum [K] float64                    product_count [1] int64
    information [K, K] float64      information_count [1] int64

``products`` is the Gram matrix ``SᵀS`` of the values (one row of ``S`` per value index, one column per
target) over the rows where every target's value is finite; ``product_sum`` and ``product_count`` are the
column sums and the number of those rows, from which the Pearson correlation of the targets follows.
``information`` is the same sum of products of the raw ``dy/dθ`` (before any normalisation), over the rows
where every raw value is finite: the Fisher information times σ² (``_identify.py``).
:class:`ProfileAggregator` holds, per output element, the sums over samples (``[K, *out]`` each).

(``dtype=torch.float32`` makes the float64 states float32, for devices without float64 such as MPS.)

Memory is fixed by ``K``, ``NB`` and the output's shape, not by the number of samples. Bucket edges do not
depend on the data (logarithmic on each side of zero with a fixed relative width, as in DDSketch and
HdrHistogram, plus a bucket for zero), so the states of several processes merge by a plain sum (min and max
by a min and a max); torchmetrics does that sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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

    def bins(self, max_bins: int | None = None) -> tuple[list[int], list[float]]:
        """The buckets as ``numpy.histogram`` gives them, ``(counts, edges)`` with one more edge than counts,
        at most ``max_bins`` of them (neighbours merged: counts stay exact, resolution drops).

        Example:
            >>> h = Histogram(3, 0, 1.5, 3.5, 5.25, 0.0, 2.0, [0.0, 0.5, 1.0, 2.0], [0, 1, 1, 1])
            >>> h.bins()
            ([1, 1, 1], [0.0, 0.5, 1.0, 2.0])
            >>> h.bins(max_bins=2)
            ([2, 1], [0.0, 1.0, 2.0])
        """
        limits, counts = list(self.bucket_limits), list(self.bucket_counts)
        if not counts:
            return [], []
        if counts[0] > 0:  # no empty bucket kept below the first: its lower edge is the minimum
            edges = [min(self.min, limits[0]), *limits]
        else:
            edges, counts = limits, counts[1:]
        # the outermost buckets also hold whatever lies beyond 2**±EXPONENT_RANGE: stretch them to min and max
        edges = [min(edges[0], self.min), *edges[1:-1], max(edges[-1], self.max)]
        if max_bins is not None and len(counts) > max_bins:
            step = math.ceil(len(counts) / max_bins)
            starts = range(0, len(counts), step)
            counts = [sum(counts[i : i + step]) for i in starts]
            edges = [*(edges[i] for i in starts), edges[-1]]
        return counts, edges


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
    products: Tensor
    product_sum: Tensor
    product_count: Tensor
    information: Tensor
    information_count: Tensor
    sum: Tensor
    abs_sum: Tensor
    sum_squares: Tensor
    min: Tensor
    max: Tensor
    buckets: Tensor

    def __init__(
        self, num_targets: int, buckets_per_octave: int = 8, dtype: torch.dtype = torch.float64, **kwargs: Any
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
        self.add_state("products", torch.zeros(k, k, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("product_sum", torch.zeros(k, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("product_count", torch.zeros(1, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("information", torch.zeros(k, k, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("information_count", torch.zeros(1, dtype=torch.long), dist_reduce_fx="sum")

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

    def update(self, values: Tensor, raw: Tensor | None = None) -> None:
        """Add ``values [K, N]``, and ``raw [K, N]``, the same values before normalisation (``None``: the same)."""
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
        rows, gram = _gram(values, finite)
        self.products += gram
        self.product_sum += torch.where(rows, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(1)
        self.product_count += rows.sum()
        if raw is not None:
            raw = raw.detach().to(self.sum.dtype)
            rows, gram = _gram(raw, torch.isfinite(raw))
        self.information += gram
        self.information_count += rows.sum()

    def compute(self) -> dict[str, Tensor]:
        """The state, reduced over every process, and summary scalars, each ``[K]`` (``buckets`` ``[K, NB]``,
        ``products`` ``[K, K]``) on the metric's device: the state's fields plus ``mean``, ``std`` (with
        Bessel's correction, as ``torch.std``), ``abs_mean`` and ``mean_square``; NaN where a target has no
        finite value. Under DDP every rank must call it; the reduced state lives only in what it returns."""
        n = self.count.to(self.sum.dtype)
        mean = self.sum / n
        difference = (self.sum_squares - self.sum * mean) / (n - 1)  # NaN for fewer than two values, as torch.std
        var = torch.where(difference.isnan(), difference, spread(difference, self.sum_squares / (n - 1)).nan_to_num(0))
        state = {name: getattr(self, name) for name in _STATE}
        extra = {"mean": mean, "std": var.sqrt(), "abs_mean": self.abs_sum / n, "mean_square": self.sum_squares / n}
        return {**state, **extra}

    def histograms(self, summary: dict[str, Tensor] | None = None) -> list[Histogram]:
        """Every target's statistics on the host, from ``summary`` (the result of :meth:`compute`; computed
        here when not given), without the empty buckets that carry no edge."""
        summary = self.compute() if summary is None else summary
        limits = self.bucket_limits()
        k = self.num_targets
        # one copy to the host; torchmetrics squeezes one-element results, hence the reshapes
        host = {name: summary[name].cpu().reshape(k, -1) for name in _PER_TARGET}
        out = []
        for row in range(k):
            counts = host["buckets"][row]
            # Keep every filled bucket and the empty bucket just below each, so every filled bucket keeps its
            # lower edge; runs of empty buckets between them merge into that one.
            filled = counts > 0
            keep = filled | torch.cat([filled[1:], torch.zeros(1, dtype=torch.bool)])
            scalar = {name: host[name][row, 0] for name in _PER_TARGET if name != "buckets"}
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


_PER_TARGET = ("count", "nonfinite", "sum", "abs_sum", "sum_squares", "min", "max", "buckets")
_STATE = (*_PER_TARGET, "products", "product_sum", "product_count", "information", "information_count")


def _gram(values: Tensor, finite: Tensor) -> tuple[Tensor, Tensor]:
    """The rows (value indices) where every target is finite, and ``SᵀS`` over them, ``[K, K]``."""
    rows = finite.all(0)
    complete = torch.where(rows, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return rows, complete @ complete.T


#: A variance computed as ``E[s²] − E[s]²`` from sums below this fraction of ``E[s²]`` (times the dtype's ``eps``) is
#: rounding, not spread: the values are constant as far as the sums can tell.
_CANCELLATION = 1024.0


def spread(variance: Tensor, mean_square: Tensor) -> Tensor:
    """``variance`` (from sums of values and of squares) where the sums resolve it, else NaN: a difference of
    sums cancels to rounding of order ``eps · E[s²]`` for values without spread (an offset, ``dy/db = 1``
    everywhere), which would decide between a tiny variance, zero and a negative one."""
    floor = _CANCELLATION * torch.finfo(variance.dtype).eps * mean_square
    return torch.where(variance > floor, variance, torch.full_like(variance, math.nan))


def correlation(products: Tensor, column_sum: Tensor, rows: Tensor) -> Tensor:
    """Pearson correlation ``[K, K]`` of the columns of ``S`` from its Gram matrix ``SᵀS``, column sums and
    row count; NaN in the row and column of a column without variance (constant values: no correlation is
    defined), and everywhere with fewer than two rows.

    Example:
        >>> s = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.5, 1.0], [3.0, 5.0, 1.0]], dtype=torch.float64)
        >>> r = correlation(s.T @ s, s.sum(0), torch.tensor(3))
        >>> torch.allclose(r[:2, :2], torch.corrcoef(s[:, :2].T))
        True
        >>> r[2].isnan().all().item(), r[:, 2].isnan().all().item()  # the constant third column
        (True, True)
    """
    n = rows.to(products.dtype).reshape(())
    mean = column_sum / n
    covariance = (products - n * torch.outer(mean, mean)) / (n - 1)
    scale = spread(covariance.diagonal(), products.diagonal() / (n - 1)).sqrt()
    return (covariance / torch.outer(scale, scale)).clamp(-1.0, 1.0)  # clamp keeps NaN; rounding past ±1 goes


def collinearity(products: Tensor) -> Tensor:
    """The collinearity index of a set of targets (Brun, Reichert and Künsch, 2001), ``1 / sqrt(λ_min)`` of
    ``S̃ᵀS̃``, where ``S̃`` is ``S`` with every column scaled to unit length and not centred; from the Gram
    matrix ``SᵀS`` ``[K, K]``. 1 for orthogonal columns, growing without bound as they approach linear
    dependence; ``inf`` when a column is zero or the columns are exactly dependent. Computed in float64.

    Example:
        >>> s = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> float(collinearity(s.T @ s))
        1.0
        >>> s = torch.tensor([[1.0, 1.0], [1.0, 1.01]], dtype=torch.float64)  # nearly the same column twice
        >>> round(float(collinearity(s.T @ s)))
        284
    """
    gram = products.to(torch.float64)
    norms = gram.diagonal().clamp_min(0).sqrt()
    if bool((norms == 0).any()) or not bool(torch.isfinite(gram).all()):
        return torch.tensor(math.inf, dtype=torch.float64)
    smallest: Tensor = torch.linalg.eigvalsh(gram / torch.outer(norms, norms))[0]
    # an eigenvalue within rounding of zero (eps of the sums' dtype, per target) is zero: exactly dependent
    # columns give inf, not whichever large number rounding left
    floor = _CANCELLATION * torch.finfo(products.dtype).eps * gram.shape[0]
    return torch.where(smallest > floor, smallest, torch.zeros_like(smallest)).rsqrt()


class ProfileAggregator(Metric):
    """Per output element, over samples: the sum, the sum of ``|value|`` and the count of finite values, for
    each of ``K`` targets, ``[K, *shape]`` each. ``update(values)`` takes ``values [K, B, *shape]``;
    non-finite values are left out of the element's sums and count.

    Example:
        >>> agg = ProfileAggregator(num_targets=1, shape=(2,))
        >>> agg.update(torch.tensor([[[1.0, -2.0], [3.0, float("nan")]]]))
        >>> mean, abs_mean = agg.profiles()
        >>> mean.tolist(), abs_mean.tolist()
        ([[2.0, -2.0]], [[2.0, 2.0]])
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    sum: Tensor
    abs_sum: Tensor
    count: Tensor

    def __init__(
        self, num_targets: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float64, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.num_targets, self.shape = num_targets, tuple(shape)
        size = (num_targets, *self.shape)
        self.add_state("sum", torch.zeros(size, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("abs_sum", torch.zeros(size, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        """Add ``values [K, B, *shape]``."""
        if values.dim() < 2 or values.shape[0] != self.num_targets or tuple(values.shape[2:]) != self.shape:
            raise ValueError(
                f"ProfileAggregator.update: expected values of shape [{self.num_targets}, B, "
                f"{', '.join(map(str, self.shape))}]; got {tuple(values.shape)}."
            )
        values = values.detach().to(self.sum.dtype)
        finite = torch.isfinite(values)
        clean = torch.where(finite, values, torch.zeros((), dtype=values.dtype, device=values.device))
        self.sum += clean.sum(1)
        self.abs_sum += clean.abs().sum(1)
        self.count += finite.sum(1)

    def compute(self) -> dict[str, Tensor]:
        """The reduced state (a collective under DDP: every rank must call it)."""
        return {"sum": self.sum, "abs_sum": self.abs_sum, "count": self.count}

    def profiles(self, state: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """The mean and the mean of ``|value|`` per element, ``[K, *shape]`` each, on the host (NaN where an
        element has no finite value)."""
        state = self.compute() if state is None else state
        size = (self.num_targets, *self.shape)
        count = state["count"].cpu().reshape(size).to(torch.float64)
        return state["sum"].cpu().reshape(size).double() / count, state["abs_sum"].cpu().reshape(size).double() / count
