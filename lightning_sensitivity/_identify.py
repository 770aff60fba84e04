"""How well the data determine each constant: the Fisher information, the covariance of fitted constants, and
identifiability, from the sums of products of per-sample derivatives. Torch only; everything here runs on the
host in float64, once per logged epoch.

With ``s`` the vector of raw ``dy/dθ`` of one aggregated value (one output element of one sample with
``reduction="none"``) and σ the standard deviation of that value's observation noise::

    F = Σ s sᵀ / σ²                       the Fisher information (the sums are the aggregator's ``information``)
    Σ = F⁻¹                               the linearised (Cramér–Rao) covariance of constants fitted to this data

Where ``F`` is singular, or numerically so, the directions it does not determine are found on ``F`` scaled to
a unit diagonal (so that units do not matter): eigenvalues at most :data:`NULL_CUTOFF` times the largest. A
target with a component above :data:`COMPONENT_CUTOFF` along them has an unbounded variance (``inf`` in its row
and column); the others keep the variance of the generalised inverse, which is exact for estimable targets.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

#: Eigenvalues of the unit-diagonal information at most this fraction of the largest are taken as zero.
NULL_CUTOFF = 1e-10
#: A target whose unit vector has a larger component along those directions has an unbounded variance.
COMPONENT_CUTOFF = 1e-4
#: Directions of the relative information ``D F D`` at most this fraction of the largest are reported as poorly
#: determined (the relative error along them is above a thousand times the best determined direction's).
POORLY = 1e-6
#: Estimates correlated beyond this (in absolute value) are reported as trading off.
TRADE_OFF = 0.95
#: Up to this many targets every pair and triple gets its collinearity index; beyond, the most collinear.
ALL_SUBSETS = 16
_MOST_COLLINEAR = 32


def fisher(information: Tensor, noise_std: float) -> Tensor:
    """``F = information / σ²`` in float64 (``information`` is the sum of ``s sᵀ``)."""
    return information.to(torch.float64) / float(noise_std) ** 2


def _null_space(f: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(scale, eigenvalues, eigenvectors)`` of ``F`` scaled to a unit diagonal (targets without effect left at
    zero), and the boolean mask of the eigenvalues taken as zero."""
    diagonal = f.diagonal().clamp_min(0)
    scale = torch.where(diagonal > 0, diagonal.rsqrt(), torch.zeros_like(diagonal))
    scaled = f * torch.outer(scale, scale)
    values, vectors = torch.linalg.eigh(scaled)
    largest = values.abs().max() if values.numel() else torch.zeros((), dtype=f.dtype)
    return scale, values, vectors, values <= NULL_CUTOFF * largest


def covariance(f: Tensor) -> tuple[Tensor, Tensor]:
    """``(Σ, unbounded)``: the inverse of the information ``F [K, K]``, with ``inf`` in the row and column of every
    target whose variance is unbounded, and the boolean mask of those targets.

    Example:
        >>> f = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> covariance(f)[0]
        tensor([[0.2500, 0.0000],
                [0.0000, 1.0000]], dtype=torch.float64)
        >>> covariance(torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64))[1]  # only a + b is determined
        tensor([True, True])
    """
    f = f.to(torch.float64)
    scale, values, vectors, null = _null_space(f)
    component = (vectors[:, null] ** 2).sum(1).sqrt()
    unbounded = (component > COMPONENT_CUTOFF) | (scale == 0)
    kept = ~null
    inverse = (vectors[:, kept] / values[kept]) @ vectors[:, kept].T  # the generalised inverse of the scaled F
    sigma = inverse * torch.outer(scale, scale)
    infinite = unbounded[:, None] | unbounded[None, :]
    return sigma.masked_fill(infinite, math.inf), unbounded


def estimate_correlation(sigma: Tensor) -> Tensor:
    """The correlation of the estimates from their covariance; NaN in the rows of unbounded targets."""
    std = sigma.diagonal().sqrt()
    corr = sigma / torch.outer(std, std)
    finite = torch.isfinite(std)
    return corr.masked_fill(~(finite[:, None] & finite[None, :]), math.nan).clamp(-1.0, 1.0)


def subsets(labels: Sequence[str], products: Tensor) -> tuple[dict[tuple[str, ...], float], str | None]:
    """Brun's collinearity index γ = 1/sqrt(λ_min(S̃ᵀS̃)) (unit-length columns, not centred) of every pair and
    triple of targets, keyed by their labels in target order; beyond :data:`ALL_SUBSETS` targets, of the most
    collinear pairs and the triples grown greedily from them, with a note that says so."""
    gram = products.to(torch.float64)
    norms = gram.diagonal().clamp_min(0).sqrt()
    unit = gram / torch.outer(norms, norms)

    def gamma(members: tuple[int, ...]) -> float:
        if any(norms[i] == 0 for i in members):
            return math.inf
        smallest = float(torch.linalg.eigvalsh(unit[list(members)][:, list(members)])[0])
        return math.inf if smallest <= 1e3 * torch.finfo(torch.float64).eps * len(members) else smallest**-0.5

    k = len(labels)
    if k <= ALL_SUBSETS:
        chosen = [*itertools.combinations(range(k), 2), *itertools.combinations(range(k), 3)]
        note = None
    else:
        cosine = unit.abs().nan_to_num(1.0).triu(1)
        order = torch.argsort(cosine.reshape(-1), descending=True)[:_MOST_COLLINEAR].tolist()
        pairs = [(i // k, i % k) for i in order]
        triples = set()
        for i, j in pairs:  # the third target most collinear with the pair
            third = max((m for m in range(k) if m not in (i, j)), key=lambda m: gamma(tuple(sorted((i, j, m)))))
            triples.add(tuple(sorted((i, j, third))))
        chosen = [*pairs, *sorted(triples)]
        note = (
            f"{k} targets: the collinearity index of the {len(pairs)} most collinear pairs and of {len(triples)} "
            "triples grown greedily from them, not of every subset."
        )
    return {tuple(labels[i] for i in members): gamma(members) for members in chosen}, note


def identifiability(labels: Sequence[str], f: Tensor, products: Tensor, theta: Tensor) -> dict[str, Any]:
    """The identifiability report: ``labels``; ``eigenvalues`` (ascending) and ``eigenvectors`` (columns) of the
    scaled information ``D F D`` with ``D = diag(|θ|)`` (relative changes; ``D = 1`` for a target at θ = 0, and for
    an input, whose θ is NaN: one value per sample); the
    collinearity index of ``subsets`` of targets; and ``verdicts``, plain-language lines."""
    f = f.to(torch.float64)
    theta = theta.to(torch.float64)
    d = torch.where((theta != 0) & torch.isfinite(theta), theta.abs(), torch.ones_like(theta))  # inputs: NaN
    values, vectors = torch.linalg.eigh(f * torch.outer(d, d))
    sigma, unbounded = covariance(f)
    found, note = subsets(labels, products)
    verdicts = _verdicts(labels, f, values, vectors, sigma, unbounded)
    if note is not None:
        verdicts.append(note)
    return {
        "labels": list(labels),
        "eigenvalues": values,
        "eigenvectors": vectors,
        "subsets": found,
        "verdicts": verdicts,
    }


def _verdicts(
    labels: Sequence[str], f: Tensor, values: Tensor, vectors: Tensor, sigma: Tensor, unbounded: Tensor
) -> list[str]:
    lines = []
    for i, label in enumerate(labels):
        if f[i, i] == 0:
            lines.append(f"{label} has no effect on the output on this data: it cannot be estimated from it.")
    corr = estimate_correlation(sigma)
    for i, j in itertools.combinations(range(len(labels)), 2):
        r = float(corr[i, j])
        if abs(r) > TRADE_OFF:
            lines.append(f"{labels[i]} and {labels[j]} trade off: the correlation of their estimates is {r:+.3f}.")
    largest = float(values.abs().max()) if values.numel() else 0.0
    for n in range(len(values)):
        relative = float(values[n]) / largest if largest > 0 else 0.0
        if relative > POORLY:
            break
        direction = vectors[:, n]
        if not all(f[i, i] > 0 for i in _members(direction)):
            continue  # a target without effect: said above
        lines.append(_flat(labels, direction, relative))
    for i, label in enumerate(labels):
        if bool(unbounded[i]) and f[i, i] > 0:
            lines.append(
                f"{label}: its standard error is unbounded; it moves the output only together with others, "
                "along a direction this data does not determine."
            )
    if not lines:
        lines.append("Every target is determined by this data (the information matrix has full rank).")
    return lines


def _members(direction: Tensor) -> list[int]:
    return [i for i in range(direction.numel()) if abs(float(direction[i])) > 0.1]


def _flat(labels: Sequence[str], direction: Tensor, relative: float) -> str:
    """A (nearly) flat direction of the relative information, ``δ log θ ∝ direction``, as people read it: the
    combination along which the output does not move, and the ratios that stay determined."""
    members = _members(direction)
    weights = direction / direction[members[0]]
    flat = relative <= NULL_CUTOFF
    how = "" if flat else f" (its information is {relative:.1g} of the best determined direction's)"
    if len(members) == 1:
        (i,) = members
        return f"{labels[i]} is poorly determined relative to its value{how}."
    moving = "·".join(f"{labels[i]}{_power(float(weights[i]))}" for i in members)
    first = members[0]
    ratios = [f"{labels[first]}{_power(1.0)}·{labels[i]}{_power(-1.0 / float(weights[i]))}" for i in members[1:]]
    kept, determined = _and(ratios), "is" if len(ratios) == 1 else "are"
    if flat:
        return (
            f"only {kept} {determined} determined: {_and([labels[i] for i in members])} can change together "
            f"along {moving} (relative changes) without moving the output."
        )
    return f"{moving} (relative changes) is poorly determined{how}; {kept} {determined} determined far better."


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


_SUPERSCRIPTS = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _power(exponent: float) -> str:
    """``¹``, ``⁻¹``, ``²``, or ``^0.5`` for an exponent that is not near a whole number."""
    whole = round(exponent)
    if abs(exponent - whole) < 0.05 and whole != 0:
        return str(whole).translate(_SUPERSCRIPTS)
    return f"^{exponent:.2g}"


def predictive_std(sensitivities: dict[str, Tensor], covariance: tuple[Sequence[str], Tensor]) -> Tensor:
    """The delta-method standard deviation of every output element of every sample, ``sqrt(diag(J Σ Jᵀ))``, from
    per-sample sensitivities (``{label: [B, *out]}``, as :func:`~lightning_sensitivity.per_sample_sensitivities`
    returns) and a covariance ``(labels, Σ [K, K])`` (as ``SensitivityMonitor.covariance()`` returns).

    ``# sensitivities[label] [B, *out], Σ [K, K] -> std [B, *out]``, on the sensitivities' device and dtype. An
    unbounded variance gives ``inf`` where its target moves the output, and nothing where it does not.

    Args:
        sensitivities: ``{label: Tensor[B, *out]}``, at least every label of ``covariance``.
        covariance: ``(labels, Σ)``, the labels and the ``[K, K]`` covariance of those targets.

    Returns:
        The standard deviation of every output element, ``[B, *out]``.

    Raises:
        KeyError: a label of the covariance has no sensitivities.
        ValueError: the covariance's shape does not match its labels.

    Example:
        >>> import torch
        >>> sens = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0, 1.0])}
        >>> predictive_std(sens, (["a", "b"], torch.tensor([[4.0, 0.0], [0.0, 9.0]])))
        tensor([2., 5.])
    """
    labels, sigma = covariance
    missing = [label for label in labels if label not in sensitivities]
    if missing:
        raise KeyError(f"predictive_std: no sensitivities for {missing}; pass those of every label of the covariance.")
    if sigma.shape != (len(labels), len(labels)):
        raise ValueError(
            f"predictive_std: the covariance is {tuple(sigma.shape)} for {len(labels)} labels; expected "
            f"({len(labels)}, {len(labels)})."
        )
    first = sensitivities[labels[0]]
    jacobian = torch.stack([sensitivities[label] for label in labels], dim=-1).to(torch.float64)  # [B, *out, K]
    cov = sigma.to(device=first.device, dtype=torch.float64)
    infinite = ~torch.isfinite(cov)
    moves = jacobian != 0
    finite_part = torch.einsum("...i,ij,...j->...", jacobian, cov.masked_fill(infinite, 0.0), jacobian)
    unbounded = (moves.unsqueeze(-1) & moves.unsqueeze(-2) & infinite).any(-1).any(-1)
    variance = finite_part.clamp_min(0).masked_fill(unbounded, math.inf)
    return variance.sqrt().to(first.dtype)
