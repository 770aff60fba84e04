"""Per-sample sensitivities of a module's output to named scalars, by forward-mode AD.

This module knows nothing about Lightning. Shapes, with ``B`` samples and ``K`` targets::

    args -> module -> y [B, *out]
    per_sample_sensitivities(...)[target] [B, *out] = d y / d target

Forward mode pushes one tangent per target through the module: dual numbers for one target, and
``torch.func.vmap`` over ``torch.func.jvp`` with one-hot tangents for several, ``chunk_size`` at a time, for
about ``1 + K`` forward passes in all. Where an op has no forward-mode formula, ``method="auto"`` falls back
to reverse mode, batched over chunks of output elements. This file decides which way to go and remembers it
per module; ``_modes.py`` and ``_per_sample.py`` hold the ways, and ``_choice.py`` measures which is cheaper
for many targets.
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lightning_sensitivity._choice import choose, per_sample_agrees, signature
from lightning_sensitivity._kernels import forward_ad_kernels, has_rnn, running_statistics
from lightning_sensitivity._modes import Model, RandomState, Result, forward, reverse
from lightning_sensitivity._per_sample import NotPerSample, per_sample_reverse
from lightning_sensitivity._refusals import culprit, is_unsupported
from lightning_sensitivity._sharded import (
    SensitivityShardingError,
    ShardedFiniteDifferences,
    ShardedModel,
    uses_fsdp,
)
from lightning_sensitivity._targets import ResolvedTarget, resolve_targets, target_tensors
from lightning_sensitivity._verify import (
    _LIKELY_CAUSES,
    FiniteDifferences,
    Mismatch,
    SensitivityCheckError,
    mismatch_message,
)

Method = Literal["auto", "forward", "reverse"]
METHODS: tuple[str, ...] = ("auto", "forward", "reverse")
Normalize = Literal["none", "parameter", "relative"]
NORMALIZATIONS: tuple[str, ...] = ("none", "parameter", "relative")

_LOG = logging.getLogger("lightning_sensitivity")


@dataclass
class _Plan:
    """What worked for a module, remembered across calls so that failed attempts are paid once."""

    rnn: bool = False
    #: embeddings with ``scale_grad_by_freq``, by name: reverse mode does not give the derivative for their weight
    frequency_scaled: list[tuple[str, nn.Embedding | nn.EmbeddingBag]] = field(default_factory=list)
    safe_kernels: bool = False
    vectorise: bool = True
    reverse: bool = False
    #: labels of targets whose missing derivative finite differences confirmed (the output does not move)
    independent: set[str] = field(default_factory=set)
    #: whether per-sample reverse mode may work (False once the model mixed samples or refused vmap)
    per_sample: bool = True
    #: the mode measured cheaper per signature (targets, input shapes): "forward" or "per-sample reverse"
    choices: dict[tuple[Any, ...], str] = field(default_factory=dict)
    #: signatures and batch layouts on which per-sample reverse mode was checked against the batched output and
    #: batched reverse mode
    per_sample_checked: set[tuple[Any, ...]] = field(default_factory=set)
    #: per signature and mode, the targets that mode has given a nonzero derivative (its zeros are believed)
    carried: dict[tuple[Any, ...], set[str]] = field(default_factory=dict)


_PLANS: weakref.WeakKeyDictionary[nn.Module, _Plan] = weakref.WeakKeyDictionary()


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
) -> dict[str, Tensor]:
    """Derivative of every output element of ``module(*args, **kwargs)`` with respect to each target.

    ``# args -> y [B, *out];  result[target] [B, *out] = d y / d target``

    Runs in the caller's grad mode, including ``torch.no_grad()`` and ``torch.inference_mode()``, and never
    changes the module: its parameters, buffers, ``requires_grad`` flags and ``.grad`` stay as they were.

    Args:
        module: the model. It is evaluated as it is (call ``module.eval()`` first for validation behaviour).
        targets: one target or a list. Each is the name of a parameter or buffer holding one element
            (``"C"``), one element of a tensor (``"net.0.weight[3, -1]"``), or a glob over names
            (``"blocks.*.alpha"``) that expands in module order.
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
    check_method(method, api)
    check_chunk_size(chunk_size, api)
    check_normalize(normalize, api)
    resolved = resolve_targets(module, targets, api)
    on_check = _raise_on_mismatch(api) if verify else None
    sens, _ = sensitivities_and_output(
        module,
        resolved,
        args,
        kwargs,
        method=method,
        chunk_size=chunk_size,
        api=api,
        on_check=on_check,
        normalize=normalize,
    )
    return sens


def _raise_on_mismatch(api: str) -> Callable[[list[Mismatch]], None]:
    def on_check(mismatches: list[Mismatch]) -> None:
        if mismatches:
            hint = "Fix the model, or leave verify=False to accept these values."
            raise SensitivityCheckError(mismatch_message(api, mismatches, "on this batch", hint), mismatches)

    return on_check


def check_method(method: str, api: str) -> None:
    """Raise a ``ValueError`` naming ``method`` unless it is one of :data:`METHODS`."""
    if method not in METHODS:
        raise ValueError(f"{api}: method must be one of {', '.join(map(repr, METHODS))}; got {method!r}.")


def check_normalize(normalize: str, api: str) -> None:
    """Raise a ``ValueError`` naming ``normalize`` unless it is one of :data:`NORMALIZATIONS`."""
    if normalize not in NORMALIZATIONS:
        choices = ", ".join(map(repr, NORMALIZATIONS))
        raise ValueError(f"{api}: normalize must be one of {choices}; got {normalize!r}.")


def check_chunk_size(chunk_size: int | None, api: str) -> None:
    """Raise a ``ValueError`` naming ``chunk_size`` unless it is ``None`` or a positive integer."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{api}: chunk_size must be a positive integer or None; got {chunk_size!r}.")


def sensitivities_and_output(
    module: nn.Module,
    resolved: Sequence[ResolvedTarget],
    args: Tensor | tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    method: Method = "auto",
    chunk_size: int | None = None,
    function: Callable[..., Any] | None = None,
    api: str = "per_sample_sensitivities",
    on_check: Callable[[list[Mismatch]], None] | None = None,
    normalize: Normalize = "none",
    agree: Callable[[str], str] | None = None,
    on_lost: Callable[[SensitivityCheckError, list[str]], None] | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """:func:`per_sample_sensitivities` for targets resolved beforehand (the callback resolves them once).

    With ``function`` (a method of ``module`` such as ``sensitivity_step``), ``function(*args, **kwargs)`` is
    differentiated instead of ``module(*args, **kwargs)``, with the module's tensors swapped in the same way.
    With ``on_check``, the result is also compared with finite differences and ``on_check`` receives the
    targets that disagree (an empty list when all agree); the check sees the derivatives before ``normalize``.
    With ``agree``, the mode ``"auto"`` measured cheaper is passed through it, and its answer is used: the callback
    makes every process of a distributed run use rank 0's choice.
    With ``on_lost``, a target whose derivative AD lost while the output moves with it (which raises
    :class:`SensitivityCheckError` without it) comes out as NaN, and ``on_lost`` receives the error and the labels
    of those targets instead.
    Returns the sensitivities and the output of the evaluation they came from (detached): the callback hands that
    output to a ``validation_step`` that asked for it (``_fused.py``).
    """
    if isinstance(args, Tensor):
        args = (args,)
    elif not isinstance(args, tuple):
        args = tuple(args)
    kwargs = {} if kwargs is None else kwargs
    plan = _PLANS.get(module)
    if plan is None:  # what the module holds is looked up once
        embeddings = [
            (name, m)
            for name, m in module.named_modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.scale_grad_by_freq
        ]
        plan = _PLANS[module] = _Plan(rnn=has_rnn(module), frequency_scaled=embeddings)
    model = Model(module, args, kwargs, function, api, running_stats=running_statistics(module, resolved, api))
    tensors = target_tensors(module, resolved)
    losses = _Losses(on_lost)
    if uses_fsdp(module):
        with ShardedModel(model, resolved, tensors) as sharded:
            sens, output = _differentiate_sharded(sharded, plan, method, chunk_size, api, on_check, losses)
            values = sharded.values() if normalize != "none" else {}
    else:
        checker = FiniteDifferences(model, tensors) if on_check is not None else None  # before the model runs
        sens, output = _differentiate(model, plan, resolved, tensors, method, chunk_size, api, agree, losses)
        losses.apply(sens)
        if checker is not None and on_check is not None:
            on_check([m for t in resolved if (m := checker.check(t, sens[t.label])) is not None])
        values = {t.label: tensors[t.name].detach()[t.index] for t in resolved}  # on the device: no host sync
    if normalize == "none":
        return sens, output
    scaled = {}
    for target in resolved:
        theta = values[target.label].to(output.dtype)
        factor = theta if normalize == "parameter" else theta / output
        scaled[target.label] = factor * sens[target.label]
    return scaled, output


class _Losses:
    """What becomes of targets whose derivative AD lost while the output moves with them: without ``on_lost``, a
    :class:`SensitivityCheckError`; with it, NaN for those targets, and ``on_lost`` gets the error."""

    def __init__(self, on_lost: Callable[[SensitivityCheckError, list[str]], None] | None) -> None:
        self.on_lost = on_lost
        self.labels: set[str] = set()

    def give_up(self, message: str, targets: Sequence[ResolvedTarget]) -> None:
        error = SensitivityCheckError(message)
        if self.on_lost is None:
            raise error
        labels = [t.label for t in targets]
        self.on_lost(error, labels)
        self.labels.update(labels)

    def apply(self, sens: dict[str, Tensor]) -> None:
        for label in self.labels:
            sens[label] = torch.full_like(sens[label], math.nan)


def choice_pending(
    module: nn.Module,
    resolved: Sequence[ResolvedTarget],
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    method: Method = "auto",
    function: Callable[..., Any] | None = None,
) -> bool:
    """Whether :func:`sensitivities_and_output` on these arguments would first measure which mode is cheaper
    (``method="auto"``, several targets, a new input structure), which with ``agree`` is a collective."""
    plan = _PLANS.get(module)
    if plan is None:
        return True
    if not _chooses(plan, method, resolved):
        return False
    return signature(Model(module, args, kwargs or {}, function), resolved) not in plan.choices


def _chooses(plan: _Plan, method: Method, resolved: Sequence[ResolvedTarget]) -> bool:
    """Whether ``method="auto"`` chooses between forward and per-sample reverse mode for these targets."""
    return method == "auto" and not plan.reverse and len(resolved) > 1 and plan.per_sample


def _differentiate_sharded(
    sharded: ShardedModel,
    plan: _Plan,
    method: Method,
    chunk_size: int | None,
    api: str,
    on_check: Callable[[list[Mismatch]], None] | None,
    losses: _Losses,
) -> tuple[dict[str, Tensor], Tensor]:
    """Forward mode for a model sharded with FSDP2: the tangents are given inside the forward of each target's
    managing module (``_sharded.py``). Every process runs the same evaluations (each is a collective)."""
    model = sharded.model
    if method == "reverse":
        raise ValueError(
            f"{api}: method='reverse' is not available for a model sharded with FSDP (fully_shard); use "
            "method='forward' or 'auto'."
        )
    checker = ShardedFiniteDifferences(sharded) if on_check is not None else None  # before the model runs
    while True:
        try:
            sens, missing, output = sharded.forward(chunk_size, plan.vectorise)
            break
        except (NotImplementedError, RuntimeError) as error:
            if not is_unsupported(error) or isinstance(error, SensitivityShardingError):
                raise
            if plan.vectorise and len(sharded.resolved) > 1:
                plan.vectorise = False
                continue
            raise RuntimeError(
                f"{api}: forward-mode AD is not available for an op in {model.name}: {culprit(error)}. Reverse "
                "mode, the usual fallback, is not available for a model sharded with FSDP."
            ) from error
    todo = [t for t in missing if t.label not in plan.independent]
    if todo:
        differences = ShardedFiniteDifferences(sharded)
        moved = {t.label: differences.depends(t, sens[t.label].dtype) for t in todo}
        # every process must take the same way on: each evaluation of a sharded model is a collective
        lost = [(t, moved[t.label]) for t in todo if _any_process(moved[t.label] is not None, output.device)]
        if lost:
            losses.give_up(_lost_message(api, model, lost, "forward-mode AD", ""), [t for t, _ in lost])
        given_up = {t.label for t, _ in lost}
        plan.independent.update(t.label for t in todo if t.label not in given_up)
    losses.apply(sens)
    if checker is not None and on_check is not None:
        on_check([m for t in sharded.resolved if (m := checker.check(t, sens[t.label])) is not None])
    return sens, output


def _any_process(flag: bool, device: torch.device) -> bool:
    """``flag`` or-ed over every process of the default group (just ``flag`` without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _differentiate(
    model: Model,
    plan: _Plan,
    resolved: Sequence[ResolvedTarget],
    tensors: dict[str, Tensor],
    method: Method,
    chunk_size: int | None,
    api: str,
    agree: Callable[[str], str] | None,
    losses: _Losses,
) -> tuple[dict[str, Tensor], Tensor]:
    """Forward mode with its fallbacks, or per-sample reverse mode where ``"auto"`` measured it cheaper (many
    targets, few output elements), then batched reverse mode where forward mode cannot go; zeros where a
    derivative never reached the output only once finite differences confirm that the output does not move.
    Returns the sensitivities and the output. Every attempt starts from the random state of the call, so the
    result sees the dropout masks of one evaluation (those finite differences see), whatever was tried before."""
    rng = RandomState(model.device)
    key = signature(model, resolved)
    unfaithful = _reverse_unfaithful(plan, resolved, tensors)

    def lost_of(
        sens: dict[str, Tensor], missing: list[ResolvedTarget], mode: str
    ) -> list[tuple[ResolvedTarget, Tensor]]:
        """The targets whose derivative AD lost, by finite differences: those that no tangent reached, and those
        whose derivative is zero everywhere while ``mode`` has not yet given them a nonzero one on this signature
        and forward mode on the target alone does not carry a zero itself (with several targets at once, or in
        reverse mode, a lost derivative comes out as zeros that nothing marks as missing). A zero that AD
        carries (a dead ReLU unit, a kink, a rounding step) is taken as it is, once and for all."""
        candidates = list(missing)
        carried = plan.carried.setdefault((key, mode), set())
        labels = {t.label for t in missing}
        known = carried | labels | plan.independent
        pending = [t for t in resolved if t.label not in known]
        if pending and next(iter(sens.values())).numel() > 0:
            moved = torch.stack([sens[t.label].ne(0).any() for t in pending]).tolist()  # one sync while any is open
            alone = mode == "forward" and (len(resolved) == 1 or not plan.vectorise or chunk_size == 1)
            for target, nonzero in zip(pending, moved, strict=True):
                if nonzero or alone or _carries_zero(model, plan, tensors, target, rng):
                    carried.add(target.label)  # alone: dual numbers already told a missing tangent from a zero
                else:
                    candidates.append(target)
        return _lost(model, plan, tensors, candidates, sens, rng, losses)

    if unfaithful is None and _chooses(plan, method, resolved):
        if key not in plan.choices:
            choice = choose(model, plan, resolved, tensors)
            plan.choices[key] = choice if agree is None else agree(choice)
            rng.restore()
        if plan.choices[key] == "per-sample reverse":
            try:
                sens, output = _per_sample(model, plan, resolved, tensors, chunk_size, key, rng)
            except Exception as error:  # noqa: BLE001 - refused on these inputs (a new batch size, train mode)
                _LOG.debug("%s: per-sample reverse mode refused (%s); forward mode", model.name, culprit(error))
            else:
                if not lost_of(sens, [], "per-sample reverse"):
                    return sens, output
            plan.choices[key] = "forward"  # forward mode may carry what per-sample reverse mode lost
            rng.restore()
    if method != "reverse" and not plan.reverse:
        result = _forward(model, plan, resolved, tensors, method, chunk_size, api)
        if result is not None:
            sens, missing, output = result
            lost = lost_of(sens, missing, "forward")
            if not lost:
                return sens, output
            if method == "forward":
                losses.give_up(_lost_message(api, model, lost, "forward-mode AD", "Use method='auto'."), _of(lost))
                return sens, output
            plan.reverse = True
            warnings.warn(
                f"{api}: {_lost_message(api, model, lost, 'forward-mode AD', '')[len(api) + 2 :]}"
                "Falling back to batched reverse mode, which costs a backward pass per chunk of output elements; "
                "pass method='reverse' to skip the forward attempt.",
                UserWarning,
                stacklevel=4,
            )
    if unfaithful is not None:
        hint = (
            "Use method='auto' or 'forward'."
            if method == "reverse"
            else "Forward mode, which would be exact, cannot run this model (see the warning above); set "
            "scale_grad_by_freq=False on that module while measuring (it changes only training's gradients)."
        )
        raise ValueError(f"{model.runner.api}: {unfaithful} {hint}")
    if method == "reverse" and plan.per_sample:
        try:  # separable models: one backward pass per output element of a sample, vectorised over samples
            sens, output = _per_sample(model, plan, resolved, tensors, chunk_size, key, rng)
        except Exception as error:  # noqa: BLE001 - any refusal (vmap, a layer that needs a batch): batched reverse
            plan.per_sample = False
            _LOG.debug("%s: per-sample reverse mode refused (%s); batched reverse mode", model.name, culprit(error))
        else:
            lost = lost_of(sens, [], "per-sample reverse")
            if lost:
                hint = "Use method='auto', which tries forward mode first."
                losses.give_up(_lost_message(api, model, lost, "reverse-mode AD", hint), _of(lost))
            return sens, output
    rng.restore()
    sens, missing, output = reverse(model, resolved, tensors, chunk_size)
    lost = lost_of(sens, missing, "reverse")
    if lost:
        losses.give_up(_lost_message(api, model, lost, "either AD mode", ""), _of(lost))
    return sens, output


def _of(lost: Sequence[tuple[ResolvedTarget, Tensor | None]]) -> list[ResolvedTarget]:
    return [target for target, _ in lost]


def _reverse_unfaithful(plan: _Plan, resolved: Sequence[ResolvedTarget], tensors: dict[str, Tensor]) -> str | None:
    """Why reverse mode would not give ``dy/dθ`` for these targets, or ``None``: the weight of an embedding
    with ``scale_grad_by_freq``, whose backward divides each row's gradient by how often its index occurs in the
    batch (by design, for training; forward mode has the true derivative)."""
    for target in resolved:
        for name, embedding in plan.frequency_scaled:
            if embedding.weight is tensors[target.name]:
                where = f"{type(embedding).__name__} {name!r}" if name else type(embedding).__name__
                return (
                    f"target {target.label!r} is in the weight of {where}, made with "
                    "scale_grad_by_freq=True: its backward divides each row's gradient by how often the row's index "
                    "occurs in the batch, so reverse mode would give that, not dy/dθ."
                )
    return None


def _per_sample(
    model: Model,
    plan: _Plan,
    resolved: Sequence[ResolvedTarget],
    tensors: dict[str, Tensor],
    chunk_size: int | None,
    key: tuple[Any, ...],
    rng: RandomState,
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-sample reverse mode, checked against batched reverse mode and the batched output at the first call
    of each signature ``key`` and batch layout; raises where the model is not per-sample on these inputs. Called
    in the call's random state ``rng``, which every evaluation starts from."""
    checked = (key, _batch_layout(model))
    check = checked not in plan.per_sample_checked
    if check and not per_sample_agrees(model, resolved, tensors):
        raise NotPerSample("per-sample reverse mode disagrees with batched reverse mode on the first samples")
    rng.restore()
    sens, _, output = per_sample_reverse(model, resolved, tensors, chunk_size, check=check)
    plan.per_sample_checked.add(checked)
    return sens, output


def _carries_zero(
    model: Model, plan: _Plan, tensors: dict[str, Tensor], target: ResolvedTarget, rng: RandomState
) -> bool:
    """Whether forward mode on ``target`` alone, under the call's random state, carries a tangent to the output
    that is zero everywhere: an all-zero derivative that AD computed, not one it lost. ``True`` too where forward
    mode cannot run the model (nothing to tell by); ``False`` where no tangent reaches the output or forward mode
    finds a nonzero derivative (then finite differences decide)."""
    after = RandomState(model.device)
    rng.restore()
    try:
        with forward_ad_kernels(plan.safe_kernels, rnn=plan.rnn):
            sens, missing, _ = forward(model, [target], tensors, None, True)
    except Exception as error:  # noqa: BLE001 - an op without a forward formula: reverse mode's zero stands
        _LOG.debug("%s: forward mode refused to confirm a zero derivative (%s)", model.name, culprit(error))
        return True
    finally:
        after.restore()
    return not missing and not bool(sens[target.label].ne(0).any())


def _batch_layout(model: Model) -> tuple[Any, ...]:
    """What decides which inputs per-sample reverse mode takes for batched (their first dimensions) and whether
    the model mixes samples (train or eval mode of every submodule)."""
    leaves, _ = tree_flatten(model.inputs)
    sizes = tuple(x.shape[0] if isinstance(x, Tensor) and x.dim() > 0 else None for x in leaves)
    return sizes, tuple(m.training for m in model.module.modules())


def _forward(
    model: Model,
    plan: _Plan,
    resolved: Sequence[ResolvedTarget],
    tensors: dict[str, Tensor],
    method: Method,
    chunk_size: int | None,
    api: str,
) -> Result | None:
    """Forward mode, stepping down (steered kernels, one tangent at a time) as ops refuse; ``None`` where
    reverse mode must take over (``method="auto"`` only), after one warning per module naming the op."""
    while True:
        try:
            with forward_ad_kernels(plan.safe_kernels, rnn=plan.rnn):
                return forward(model, resolved, tensors, chunk_size, plan.vectorise)
        except (NotImplementedError, RuntimeError) as error:
            if not is_unsupported(error):
                raise
            if not plan.safe_kernels:
                plan.safe_kernels = True  # fused kernels first: their composite versions have formulas
            elif plan.vectorise and len(resolved) > 1:
                # torch.func refuses more than dual numbers do (an op without a vmap rule, a custom Function
                # without setup_context, requires_grad_ inside the model): one tangent at a time first
                plan.vectorise = False
            elif method == "forward":
                raise RuntimeError(
                    f"{api}: forward-mode AD is not available for an op in {model.name}: {culprit(error)}. "
                    "Use method='auto' to fall back to reverse mode, or method='reverse'."
                ) from error
            else:
                plan.reverse = True
                warnings.warn(
                    f"{api}: forward-mode AD is not available for an op in {model.name}: {culprit(error)}; "
                    "falling back to batched reverse mode, which costs a backward pass per chunk of output "
                    "elements. Pass method='reverse' to skip the forward attempt.",
                    UserWarning,
                    stacklevel=5,
                )
                return None


def _lost(
    model: Model,
    plan: _Plan,
    tensors: dict[str, Tensor],
    missing: list[ResolvedTarget],
    sens: dict[str, Tensor],
    rng: RandomState,
    losses: _Losses,
) -> list[tuple[ResolvedTarget, Tensor]]:
    """The ``missing`` targets (no derivative reached the output) that the output moves with nonetheless,
    by central finite differences under the random state ``rng`` of the AD evaluation, with those differences.
    Of the others, those whose value does not reach the
    output at all (:meth:`FiniteDifferences.reaches`) are remembered as independent; the rest (the output is
    flat along them here, as ``x * k.item()`` is at ``x = 0``) are checked again at the next call."""
    todo = [t for t in missing if t.label not in plan.independent]
    if not todo or next(iter(sens.values())).numel() == 0:  # an empty output tells nothing
        return []
    differences = FiniteDifferences(model, tensors, rng)  # the random numbers (dropout masks) of the AD call
    lost = []
    for target in todo:
        moved = differences.depends(target, sens[target.label].dtype)
        if moved is not None:
            lost.append((target, moved))
        elif not differences.reaches(target):  # independent whatever the inputs: never checked again
            if differences.reaches_past_the_module(target):
                losses.give_up(
                    f"{model.runner.api}: the output of {model.name} depends on {target.label!r} through a reference "
                    "of its own (a functools.partial or a list holding the parameter, a view taken in __init__), not "
                    f"through the module's attribute {target.name!r}: the engine gives the derivative to the "
                    "attribute, so it would have been reported as zero. Read the tensor from the module inside "
                    "forward (for example F.linear(x, self.layer.weight)).",
                    [target],
                )
                continue
            plan.independent.add(target.label)
    return lost


def _lost_message(
    api: str, model: Model, lost: Sequence[tuple[ResolvedTarget, Tensor | None]], mode: str, hint: str
) -> str:
    # ``fd`` is None on a process whose own differences did not move: ``_differentiate_sharded`` lists a target
    # that any process saw move on every process, so that they raise together
    listed = ", ".join(
        f"{t.label!r} (central differences of norm {float(torch.linalg.vector_norm(fd)):.3g})"
        if fd is not None
        else f"{t.label!r} (on another process)"
        for t, fd in lost
    )
    return (
        f"{api}: the output of {model.name} moves with {listed}, but no derivative along it reached the output "
        f"in {mode}; it would have been reported as zero. {_LIKELY_CAUSES} {hint}".rstrip()
        + " "
    )
