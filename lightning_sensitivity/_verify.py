"""Finite differences as a check on automatic differentiation.

An AD result can be wrong without an error: an op torch marks non-differentiable gives a zero tangent, a
custom ``autograd.Function`` that captures a parameter (instead of taking it as an input) hides it, reentrant
checkpointing drops tangents. Central differences see the function itself. For each target ``θ`` the model
is evaluated at ``θ - h`` and ``θ + h`` (and once at ``θ``), under the random state of the AD evaluation
(same dropout masks), with the module untouched; then, per output element, the AD value is compared with the
closest of the central, forward and backward differences (a ReLU kink or a step in ``[θ - h, θ + h]`` spoils
at most one side), an element's rounding noise ``~ eps |y| / h`` is forgiven, and what is left is compared
with the AD values in a norm over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_sensitivity._model import Model, RandomState, fresh
from lightning_sensitivity._targets import ResolvedTarget

#: Rounding noise forgiven per output element, in units of ``eps * |y| / h``: an output of a deep network
#: carries more than one rounding.
NOISE = 16.0

_LIKELY_CAUSES = (
    "Likely causes: a custom torch.autograd.Function without a jvp (or with a wrong one) that captures the "
    "parameter instead of taking it as an input; reentrant checkpointing (torch.utils.checkpoint with "
    "use_reentrant=True drops forward-mode tangents: use use_reentrant=False); an op torch marks "
    "non-differentiable, such as torch.special.bessel_j0 and other special functions; a solver or library that "
    "keeps only parameters with requires_grad=True; or an output that is not differentiable at this point "
    "(a step, a quantiser with a straight-through gradient)."
)


class SensitivityCheckError(RuntimeError):
    """Automatic differentiation and finite differences disagree, or the output depends on a target whose
    derivative no AD mode carries.

    Attributes:
        mismatches: one :class:`Mismatch` per target that failed the check.
    """

    def __init__(self, message: str, mismatches: Sequence[Mismatch] = ()) -> None:
        super().__init__(message)
        self.mismatches = list(mismatches)


@dataclass(frozen=True)
class Mismatch:
    """One target whose AD values and finite differences disagree (an item of
    ``SensitivityCheckError.mismatches``).

    Attributes:
        label: the target's canonical label (``name`` or ``name[i, j]``).
        ad_norm: norm over the batch of the AD values.
        fd_norm: norm over the batch of the central finite differences.
        error_norm: norm over the batch of what separates them beyond rounding noise.
        step: the realised step ``(θ + h) - (θ - h)``.
        frozen_norm: the part of ``error_norm`` in output elements that did not move at all, bit for bit, at
            ``θ - h`` and ``θ + h``, where AD gives a derivative.
    """

    label: str
    ad_norm: float
    fd_norm: float
    error_norm: float
    step: float
    frozen_norm: float = 0.0

    @property
    def frozen(self) -> bool:
        """Whether the disagreement is, within the check's tolerance, all in elements that did not move at all."""
        rest = max(self.error_norm**2 - self.frozen_norm**2, 0.0) ** 0.5
        return self.frozen_norm > 0 and rest <= 0.1 * self.error_norm

    def describe(self) -> str:
        """The target and the three norms, one line of the error message."""
        text = (
            f"{self.label!r}: |AD| = {self.ad_norm:.3g}, |finite differences| = {self.fd_norm:.3g}, "
            f"|difference| = {self.error_norm:.3g} (norms over the batch; step {self.step:.3g})"
        )
        if self.frozen_norm > 0:
            text += f", of which {self.frozen_norm:.3g} in output elements that did not move at all"
        return text


def tolerance(dtype: torch.dtype) -> float:
    """Relative disagreement, in the norm over the batch, beyond which the check fails."""
    return 0.25 if torch.finfo(dtype).bits <= 16 else 0.1


class FiniteDifferences:
    """Evaluations of ``model`` with one element of one target's tensor moved, under the random state and on
    copies of the inputs taken at construction (make it before the AD evaluation it is to check: the model
    may update its inputs in place)."""

    def __init__(self, model: Model, tensors: dict[str, Tensor], rng: RandomState | None = None) -> None:
        self.model = model
        self.tensors = tensors
        self.args, self.kwargs = fresh((model.args, model.kwargs))
        #: the random state of every evaluation: ``rng`` (that of the AD evaluation to confirm), else the current
        self.rng = RandomState(model.device) if rng is None else rng
        self._base: Tensor | None = None

    def evaluate(self, replaced: dict[str, Tensor]) -> Tensor:
        """The output, in float64, with ``replaced`` in place of the module's tensors."""
        with self.rng.replayed():
            args, kwargs = fresh((self.args, self.kwargs))
            out: Tensor = self.model(replaced, args=args, kwargs=kwargs)
        return out.detach().double()

    def base(self) -> Tensor:
        if self._base is None:
            self._base = self.evaluate({})
        return self._base

    def moved(self, target: ResolvedTarget) -> tuple[Tensor, Tensor, Step, Step]:
        """Outputs at ``θ - h`` and ``θ + h`` and the realised steps down and up: numbers, or for an input (every
        sample's element moved at once, by its own step) tensors shaped to divide the output ``[B, 1, ...]``."""
        tensor = self.tensors[target.name]
        step_down: Step
        step_up: Step
        if target.is_input:
            down, up, steps_down, steps_up = stepped_inputs(tensor, target.index)
            shape = (-1, *(1,) * (self.base().dim() - 1))
            step_down, step_up = steps_down.reshape(shape), steps_up.reshape(shape)
        else:
            down, up, step_down, step_up = stepped(tensor, target.index)
        if not _realised(step_down, step_up):
            nan = torch.full_like(self.base(), math.nan)
            return nan, nan, math.nan, math.nan
        return self.evaluate({target.name: down}), self.evaluate({target.name: up}), step_down, step_up

    def check(self, target: ResolvedTarget, ad: Tensor) -> Mismatch | None:
        """Compare ``ad`` (``[B, *out]``, the target's AD sensitivities) with finite differences; ``None`` when
        they agree."""
        y0 = self.base()
        y_down, y_up, step_down, step_up = self.moved(target)
        if not _realised(step_down, step_up):
            return None  # a non-finite θ: nothing to compare
        central = (y_up - y_down) / (step_up + step_down)
        forward = (y_up - y0) / step_up
        backward = (y0 - y_down) / step_down
        a = ad.detach().double()
        finite = torch.isfinite(a) & torch.isfinite(central) & torch.isfinite(forward) & torch.isfinite(backward)
        zero = torch.zeros((), dtype=a.dtype, device=a.device)
        a, central, forward, backward = (torch.where(finite, v, zero) for v in (a, central, forward, backward))
        error = torch.stack([(a - central).abs(), (a - forward).abs(), (a - backward).abs()]).amin(0)
        noise = _noise(ad.dtype, y0, y_down, y_up, step=_smaller(step_down, step_up))
        excess = torch.where(finite, (error - noise).clamp_min(0), zero)
        ad_norm, fd_norm, error_norm = (float(torch.linalg.vector_norm(v)) for v in (a, central, excess))
        dtype = min(ad.dtype, self.tensors[target.name].dtype, key=lambda d: torch.finfo(d).bits)
        if error_norm > tolerance(dtype) * max(ad_norm, fd_norm):
            still = (y_down == y0) & (y_up == y0)  # rounding that freezes the output, or a flat function
            frozen_norm = float(torch.linalg.vector_norm(torch.where(still, excess, zero)))
            step = step_down + step_up
            step = float(step.nanmean()) if isinstance(step, Tensor) else step
            return Mismatch(target.label, ad_norm, fd_norm, error_norm, step, frozen_norm)
        return None

    def depends(self, target: ResolvedTarget, dtype: torch.dtype) -> Tensor | None:
        """The central differences along ``target`` if the output (of ``dtype``) moves beyond rounding noise,
        else ``None``."""
        y_down, y_up, step_down, step_up = self.moved(target)
        if not _realised(step_down, step_up):
            return None
        central = (y_up - y_down) / (step_down + step_up)
        beyond = (central.abs() > _noise(dtype, y_down, y_up, step=step_down + step_up)) & torch.isfinite(central)
        return central if bool(beyond.any()) else None

    def reaches(self, target: ResolvedTarget) -> bool:
        """Whether the target's value reaches the output at all: with it made NaN, does any output element turn
        NaN? NaN survives what finite differences cannot see through (a product with zero, ``.item()``), so a
        target that it does not reach is independent of the output whatever the inputs. ``True`` where the model
        refuses NaN (nothing is learned, so nothing is taken for independent)."""
        tensor = self.tensors[target.name].detach()
        if not tensor.is_floating_point():
            return True
        poisoned = tensor.clone()
        poisoned[target.element] = math.nan
        try:
            output = self.evaluate({target.name: poisoned})
        except Exception:  # noqa: BLE001 - a model that refuses NaN (a distribution's checks, an ODE step size):
            return True  # nothing learned, so the target is not taken for independent
        return self._turned_nan(output)

    def reaches_past_the_module(self, target: ResolvedTarget) -> bool:
        """Whether the target's value reaches the output when made NaN in the module's own tensor, in place (and
        put back bit for bit), where :meth:`reaches` found that it does not when the module's attribute is
        swapped: then the model reads it through another reference (a ``functools.partial`` or a list holding the
        parameter, a view taken at construction), which no swapped-in tangent reaches either."""
        tensor = self.tensors[target.name]
        if target.is_input or not tensor.is_floating_point() or tensor.is_inference():  # inference: read-only here
            return False
        with torch.no_grad():  # the write only: the model runs in the caller's mode, which it may need
            kept = tensor[target.index].clone()
            tensor[target.index] = math.nan
        try:
            output = self.evaluate({})
        except Exception:  # noqa: BLE001 - a probe that could not evaluate proves no dependence
            return False
        finally:
            with torch.no_grad():
                tensor[target.index] = kept
        return self._turned_nan(output)

    def _turned_nan(self, output: Tensor) -> bool:
        """Whether an output element is NaN that is not NaN at the target's own value."""
        return bool((output.isnan() & ~self.base().isnan()).any())


def stepped(tensor: Tensor, index: tuple[int, ...]) -> tuple[Tensor, Tensor, float, float]:
    """Copies of ``tensor`` with the element at ``index`` moved down and up by the central-difference step, and
    the steps realised in its dtype, ``θ - (θ - h)`` and ``(θ + h) - θ`` (NaN for a non-finite θ). ``h`` is
    ``eps^(1/3) |θ|`` (``eps^(1/3)`` at θ = 0), grown until it is represented (a subnormal θ, bf16)."""
    base = tensor.detach()
    theta = float(base[index])
    if not math.isfinite(theta):
        return base, base, math.nan, math.nan
    h = torch.finfo(base.dtype).eps ** (1 / 3) * (abs(theta) if theta != 0 else 1.0)
    for _ in range(64):
        down, up = base.clone(), base.clone()
        down[index] = theta - h
        up[index] = theta + h
        step_down, step_up = theta - float(down[index]), float(up[index]) - theta
        if step_down > 0 and step_up > 0:
            break
        h *= 2
    return down, up, step_down, step_up


#: A realised step: a number, or one per sample for an input target.
Step = float | Tensor


def _realised(down: Step, up: Step) -> bool:
    """Whether a step was taken at all (for an input, for some sample)."""
    if isinstance(down, Tensor) or isinstance(up, Tensor):
        return bool(((torch.as_tensor(down) > 0) & (torch.as_tensor(up) > 0)).any())
    return down > 0 and up > 0


def _smaller(a: Step, b: Step) -> Step:
    return torch.minimum(torch.as_tensor(a), torch.as_tensor(b)) if isinstance(a, Tensor) else min(a, b)


def stepped_inputs(tensor: Tensor, index: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`stepped` for an input: every sample's element ``[:, *index]`` moved by its own step; the realised
    steps are ``[B]`` (NaN where the element is not finite)."""
    base = tensor.detach()
    element: tuple[Any, ...] = (slice(None), *index)
    with torch.inference_mode(False):
        theta = base[element].clone()
        h = torch.finfo(base.dtype).eps ** (1 / 3) * torch.where(theta != 0, theta.abs(), torch.ones_like(theta))
        for _ in range(64):  # a step that rounds to nothing grows until it is represented
            down, up = base.clone(), base.clone()
            down[element] = theta - h
            up[element] = theta + h
            step_down, step_up = theta - down[element], up[element] - theta
            pending = ((step_down <= 0) | (step_up <= 0)) & torch.isfinite(theta)
            if not bool(pending.any()):
                break
            h = torch.where(pending, 2 * h, h)
    nan = torch.full_like(theta, math.nan)
    finite = torch.isfinite(theta)
    return down, up, torch.where(finite, step_down, nan), torch.where(finite, step_up, nan)


def _noise(dtype: torch.dtype, *outputs: Tensor, step: Step) -> Tensor:
    """Per element, the rounding noise of a difference quotient of outputs of ``dtype`` over ``step``."""
    magnitude = torch.stack([y.abs() for y in outputs]).amax(0)
    return NOISE * torch.finfo(dtype).eps * magnitude / step


def mismatch_message(api: str, mismatches: Sequence[Mismatch], where: str, hint: str) -> str:
    """The text of a :class:`SensitivityCheckError`: the targets with their magnitudes, causes and what to do."""
    listed = "; ".join(m.describe() for m in mismatches)
    causes = _LIKELY_CAUSES
    if all(m.frozen for m in mismatches):
        causes = (
            "The disagreement is in output elements that did not move at all while the target moved, where AD "
            "gives a derivative. Either rounding freezes them, and AD is right: an attention row that a mask fills "
            "with finfo(dtype).min (a left-padded position in eager attention), whose scores float32 cannot see "
            "move; the loop of torch.autograd.grad gives AD's values there. Or the function is flat with a "
            "gradient of its own (a quantiser with a straight-through gradient), and AD is not the derivative."
        )
    return (
        f"{api}: automatic differentiation and central finite differences disagree {where} for "
        f"{len(mismatches)} target(s): {listed}. {causes} {hint}"
    )
