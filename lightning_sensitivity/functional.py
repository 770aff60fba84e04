"""``per_sample_sensitivities``: the derivative of every output element of a module with respect to named scalars,
for every sample, by forward-mode AD. Plain PyTorch: nothing here loads Lightning.

This is the public layer: it checks the arguments, resolves the targets and hands off to the engine
(``_engine.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

import lightning_sensitivity._arguments as _arguments
from lightning_sensitivity._engine import Method, Normalize, sensitivities_and_output
from lightning_sensitivity._plans import DEFAULT_PLANS, Plans
from lightning_sensitivity._targets import resolve_all
from lightning_sensitivity._verify import Mismatch, SensitivityCheckError, mismatch_message

__all__ = ["Method", "Normalize", "per_sample_sensitivities"]


def per_sample_sensitivities(
    module: nn.Module,
    targets: str | Sequence[str],
    args: Tensor | tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    method: Method = "auto",
    chunk_size: int | None = None,
    verify: bool = False,
    normalize: Normalize = "none",
    plans: Plans | None = None,
) -> dict[str, Tensor]:
    """Derivative of every output element of ``module(*args, **kwargs)`` with respect to each target.

    ``# args -> y [B, *out];  result[target] [B, *out] = d y / d target``

    Runs in the caller's grad mode, including ``torch.no_grad()`` and ``torch.inference_mode()``, and never
    changes the module: its parameters, buffers, ``requires_grad`` flags and ``.grad`` stay as they were.

    Args:
        module: the model. It is evaluated as it is (call ``module.eval()`` first for validation behaviour).
        targets: one target or a list. Each is the name of a parameter or buffer holding one element
            (``"C"``), one element of a tensor (``"net.0.weight[3, -1]"``), every element or a slice
            (``"net.0.weight[...]"``, ``"net.0.weight[3, :]"``: one target per element, row-major, labelled
            ``name[i, j]``), or a glob over names (``"blocks.*.alpha"``) that expands in module order.
        args: positional arguments of the forward call, a tuple (a single tensor is taken as ``(x,)``).
        kwargs: keyword arguments of the forward call.
        method: ``"forward"`` (forward-mode AD: about one tangent pass per target), ``"reverse"`` (reverse mode
            per sample, vectorised over samples: about one backward pass per output element of a sample,
            whatever the number of targets; batched over output elements for a model that mixes samples), or
            ``"auto"``: forward mode, except where, for several targets, a measurement on the first call (once
            per module, targets and input shape; logged at debug level by the ``lightning_sensitivity`` logger)
            finds per-sample reverse mode cheaper; and reverse mode, with one warning per module, where an op
            has no forward-mode formula. A model sharded with FSDP2 is differentiated in forward mode.
        chunk_size: how many tangents (forward mode), samples (per-sample reverse mode) or output elements
            (batched reverse mode) are pushed through at once; memory grows with it. ``None``: all targets at
            once in forward mode, as many samples as keep about 2^25 gradient elements in per-sample reverse
            mode, and a block of at most 256 output elements in batched reverse mode.
        verify: also compare the result with central finite differences (about two more forward passes per
            target) and raise :class:`~lightning_sensitivity.SensitivityCheckError` where they disagree.
        normalize: ``"none"``: ``dy/dθ``; ``"parameter"``: ``θ · dy/dθ`` (the scaled sensitivity, in the units
            of ``y``); ``"relative"``: ``(θ / y) · dy/dθ`` (the elasticity: the relative change of ``y`` per
            relative change of ``θ``; non-finite where ``y`` is 0).
        plans: where what is learned about the module is kept (a fallback that worked, the mode ``"auto"``
            measured cheaper; see :class:`~lightning_sensitivity.Plans`); ``None``:
            ``lightning_sensitivity.DEFAULT_PLANS``, one for the process. A forced ``method`` always tries its
            own mode, whatever was learned.

    Returns:
        A dict from each target's canonical label (``name`` or ``name[i, j]``, negative indices made
        positive), in the order given, to a detached tensor shaped, placed and typed like the output.

    Raises:
        TypeError: the output is not a floating-point tensor, or a target is not floating point.
        ValueError: a bad target, ``method`` or ``chunk_size``; an output without a sample dimension.
        IndexError: a target's index is out of range or of the wrong rank.
        SensitivityCheckError: with ``verify``, AD and finite differences disagree; always, when the output
            moves with a target whose derivative no AD mode carries (it would otherwise be reported as zero).

    Example:
        The seed problem, ``y = C * x``, whose derivative with respect to ``C`` is ``x``:

        >>> import torch
        >>> from torch import nn
        >>> class Scale(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.C = nn.Parameter(torch.tensor(-5.0))
        ...     def forward(self, x):
        ...         return self.C * x
        >>> x = torch.arange(10.0)
        >>> sens = per_sample_sensitivities(Scale(), "C", (x,))
        >>> sens["C"]
        tensor([0., 1., 2., 3., 4., 5., 6., 7., 8., 9.])
        >>> torch.equal(sens["C"], x)
        True

        One element of a weight matrix, under ``torch.inference_mode()`` as in Lightning's validation:

        >>> net = nn.Sequential(nn.Linear(3, 2), nn.Tanh())
        >>> with torch.inference_mode():
        ...     out = per_sample_sensitivities(net, ["0.weight[1, -1]", "0.bias[1]"], torch.ones(4, 3))
        >>> list(out), out["0.weight[1, 2]"].shape
        (['0.weight[1, 2]', '0.bias[1]'], torch.Size([4, 2]))
    """
    api = "per_sample_sensitivities"
    _arguments.one_of(method, _arguments.METHODS, api, "method")
    _arguments.positive(chunk_size, api, "chunk_size", optional=True)
    _arguments.one_of(normalize, _arguments.NORMALIZATIONS, api, "normalize")
    if plans is not None and not isinstance(plans, Plans):
        raise TypeError(f"{api}: plans must be a lightning_sensitivity.Plans or None; got {type(plans).__name__}.")
    args = (args,) if isinstance(args, Tensor) else tuple(args)
    resolved = resolve_all(module, targets, api, {"args": args, "kwargs": {} if kwargs is None else kwargs})

    def on_check(mismatches: list[Mismatch]) -> None:
        if mismatches:
            hint = "Fix the model, or leave verify=False to accept these values."
            raise SensitivityCheckError(mismatch_message(api, mismatches, "on this batch", hint), mismatches)

    return sensitivities_and_output(
        module,
        resolved,
        args,
        kwargs,
        plans=DEFAULT_PLANS if plans is None else plans,
        method=method,
        chunk_size=chunk_size,
        api=api,
        on_check=on_check if verify else None,
        normalize=normalize,
    ).values
