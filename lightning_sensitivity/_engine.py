"""The engine: one call differentiates a module's output with respect to resolved targets, on the module's
device, in the caller's grad mode, and leaves the module, its inputs and the random stream as they were.

Shapes, with ``B`` samples and ``K`` targets: ``args -> module -> y [B, *out]``;
``sensitivities[label] [B, *out] = d y / d target``.

The way is forward mode (``_modes.py``), stepping down as ops refuse (steered kernels, one tangent at a time);
per-sample reverse mode where ``method="auto"`` measured it cheaper (``_choice.py``); batched reverse mode where
forward mode cannot go. What worked is kept in the module's :class:`~lightning_sensitivity._plans.Plan`; a
forced method always tries its own mode. Every zero is confirmed (``_lost.py``) and, with ``on_check``, the
result is compared with finite differences (``_verify.py``). A model sharded with FSDP2 takes ``_sharded.py``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lightning_sensitivity._choice import choose, per_sample_agrees, signature
from lightning_sensitivity._kernels import forward_ad_kernels, running_statistics
from lightning_sensitivity._lost import Losses, Lost, Zeros, lost_message, targets_of
from lightning_sensitivity._model import Model, RandomState
from lightning_sensitivity._modes import forward, reverse
from lightning_sensitivity._per_sample import NotPerSample, per_sample_reverse
from lightning_sensitivity._plans import Plan, Plans, Timer
from lightning_sensitivity._refusals import culprit, is_unsupported
from lightning_sensitivity._sharded import SensitivityShardingError, ShardedFiniteDifferences, ShardedModel, uses_fsdp
from lightning_sensitivity._targets import ResolvedTarget, target_tensors
from lightning_sensitivity._verify import FiniteDifferences, Mismatch, SensitivityCheckError

Method = Literal["auto", "forward", "reverse"]
Normalize = Literal["none", "parameter", "relative"]
#: ``(sensitivities by label, the output they were computed at)``: what one way of differentiating gives
Differentiated = tuple[dict[str, Tensor], Tensor]


class Sensitivities(NamedTuple):
    """What the engine returns.

    Attributes:
        values: by label, ``[B, *out]``: the sensitivities, normalised as asked.
        output: the output of the evaluation they came from, detached.
        raw: by label, ``dy/dθ`` whatever the normalisation (the same dict as ``values`` without one).
    """

    values: dict[str, Tensor]
    output: Tensor
    raw: dict[str, Tensor]


_LOG = logging.getLogger("lightning_sensitivity")


def sensitivities_and_output(
    module: nn.Module,
    resolved: Sequence[ResolvedTarget],
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    plans: Plans,
    method: Method = "auto",
    chunk_size: int | None = None,
    function: Callable[..., Any] | None = None,
    api: str = "per_sample_sensitivities",
    on_check: Callable[[list[Mismatch]], None] | None = None,
    normalize: Normalize = "none",
    agree: Callable[[str], str] | None = None,
    on_lost: Callable[[SensitivityCheckError, list[str]], None] | None = None,
) -> Sensitivities:
    """The sensitivities of ``module(*args, **kwargs)`` (or ``function(*args, **kwargs)``, a method of ``module``
    such as ``sensitivity_step``) to targets resolved beforehand, and the output of the evaluation they came from
    (detached; the monitor hands it to a step whose call it took over).

    ``on_check`` receives the targets whose derivatives disagree with finite differences (an empty list when all
    agree), before ``normalize``. ``agree`` maps the mode ``"auto"`` measured cheaper to the one to use (under
    several processes, rank 0's). ``on_lost`` turns a derivative AD lost into NaN and is told (see
    :class:`~lightning_sensitivity._lost.Losses`); without it, that raises.
    """
    kwargs = {} if kwargs is None else kwargs
    plan = plans[module]
    paths = {t.name: t.path for t in resolved if t.is_input}
    running_stats = running_statistics(module, resolved, api)
    model = Model(module, args, kwargs, plan, function, api, running_stats=running_stats, paths=paths)
    tensors = target_tensors(module, resolved, {"args": args, "kwargs": kwargs})
    losses = Losses(on_lost)
    if paths:
        check_inputs(model, resolved, tensors)
    if uses_fsdp(module):
        if paths:
            raise ValueError(f"{api}: input targets are not supported for a model sharded with FSDP (fully_shard).")
        with ShardedModel(model, resolved, tensors) as sharded:
            sens, output = _sharded(sharded, method, chunk_size, on_check, losses)
            values = sharded.values() if normalize != "none" else {}
    else:
        checker = FiniteDifferences(model, tensors) if on_check is not None else None  # before the model runs
        sens, output = _Call(model, resolved, tensors, method, chunk_size, agree, losses, plans.timer).run()
        losses.apply(sens)
        if checker is not None and on_check is not None:
            on_check([m for t in resolved if (m := checker.check(t, sens[t.label])) is not None])
        values = {t.label: tensors[t.name].detach()[t.element] for t in resolved}  # on the device: no host sync
    if normalize == "none":
        return Sensitivities(sens, output, sens)
    scaled = {}
    for target in resolved:
        theta = values[target.label].to(output.dtype)
        if target.is_input:  # each sample's own value, [B] -> [B, 1, ...]
            theta = theta.reshape(-1, *(1,) * (output.dim() - 1))
        factor = theta if normalize == "parameter" else theta / output
        scaled[target.label] = factor * sens[target.label]
    return Sensitivities(scaled, output, sens)


def check_inputs(model: Model, resolved: Sequence[ResolvedTarget], tensors: dict[str, Tensor]) -> None:
    """Input targets give each sample's derivative with respect to its own input, which a tangent on every
    sample's element at once gives only where samples do not mix: checked once per signature and batch layout,
    by a backward pass from the other samples' outputs to the first sample's input (it must be zero)."""
    key = ("inputs", signature(model, resolved), _batch_layout(model))
    if key in model.plan.per_sample_checked:
        return
    output = model.plain()
    for name in dict.fromkeys(t.name for t in resolved if t.is_input):
        x = tensors[name]
        if output.dim() == 0 or x.shape[0] != output.shape[0]:
            label = next(t.label for t in resolved if t.name == name)
            raise ValueError(
                f"{model.api}: input target {label!r} has {x.shape[0]} rows, but the output of {model.name} has "
                f"{output.shape[0] if output.dim() else 'no'} samples: an input target's first dimension must be "
                "the output's samples."
            )
        if x.shape[0] < 2:
            continue
        with torch.inference_mode(False), torch.enable_grad():
            leaf = x.detach().clone().requires_grad_(True)
            try:
                rest = model({name: leaf})[1:].sum()
                (grad,) = torch.autograd.grad(rest, leaf, allow_unused=True)
            except RuntimeError as error:  # no backward pass to check by: taken on trust, said in the debug log
                _LOG.debug("%s: could not check that samples do not mix (%s)", model.name, culprit(error))
                continue
        if grad is not None and bool(grad[0].ne(0).any()):
            label = next(t.label for t in resolved if t.name == name)
            raise ValueError(
                f"{model.api}: {model.name} mixes samples: the first sample's {name} moves the other samples' "
                f"outputs (batch norm in training mode, attention or pooling across the batch). Input target "
                f"{label!r} means each sample's derivative with respect to its own input, which is not defined "
                "here; call .eval(), or differentiate one sample at a time."
            )
    model.plan.per_sample_checked.add(key)


def choice_pending(
    plans: Plans,
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
    if module not in plans:
        return True
    plan = plans[module]
    if not _chooses(plan, method, resolved):
        return False
    return signature(Model(module, args, kwargs or {}, plan, function), resolved) not in plan.choices


def _chooses(plan: Plan, method: Method, resolved: Sequence[ResolvedTarget]) -> bool:
    """Whether ``method="auto"`` chooses between forward and per-sample reverse mode for these targets."""
    return method == "auto" and not plan.reverse and len(resolved) > 1 and plan.per_sample


class _Call:
    """One call of the engine on an unsharded model. Every attempt starts from the random state of the call, so
    the result sees the dropout masks of one evaluation (those finite differences see), whatever was tried
    before."""

    def __init__(
        self,
        model: Model,
        resolved: Sequence[ResolvedTarget],
        tensors: dict[str, Tensor],
        method: Method,
        chunk_size: int | None,
        agree: Callable[[str], str] | None,
        losses: Losses,
        timer: Timer,
    ) -> None:
        self.model, self.plan, self.resolved, self.tensors = model, model.plan, resolved, tensors
        self.method, self.chunk_size, self.agree, self.losses, self.timer = method, chunk_size, agree, losses, timer
        self.rng = RandomState(model.device)
        self.key = signature(model, resolved)
        self.zeros = Zeros(model, resolved, tensors, self.rng, self.key, chunk_size, losses)

    def run(self) -> Differentiated:
        """Per-sample reverse mode where measured cheaper; else forward mode; else reverse mode."""
        faithful = _reverse_unfaithful(self.plan, self.resolved, self.tensors) is None
        result = self._per_sample_if_cheaper() if faithful and _chooses(self.plan, self.method, self.resolved) else None
        if result is None and self._tries_forward():
            result = self._forward_mode()
        return self._reverse_mode() if result is None else result

    def _tries_forward(self) -> bool:
        forced = self.method == "forward"  # a forced method always tries its mode, whatever was learned
        return forced or (self.method == "auto" and not self.plan.reverse)

    def _per_sample_if_cheaper(self) -> Differentiated | None:
        plan, key = self.plan, self.key
        if key not in plan.choices:
            choice = choose(self.model, self.resolved, self.tensors, self.timer)
            plan.choices[key] = choice if self.agree is None else self.agree(choice)
            self.rng.restore()
        if plan.choices[key] != "per-sample reverse":
            return None
        try:
            sens, output = self._per_sample()
        except Exception as error:  # noqa: BLE001 - refused on these inputs (a new batch size, train mode)
            _LOG.debug("%s: per-sample reverse mode refused (%s); forward mode", self.model.name, culprit(error))
        else:
            if not self.zeros.lost(sens, [], "per-sample reverse"):
                return sens, output
        plan.choices[key] = "forward"  # forward mode may carry what per-sample reverse mode lost
        self.rng.restore()
        return None

    def _forward_mode(self) -> Differentiated | None:
        """Forward mode; ``None`` where reverse mode must take over (``"auto"`` only, after one warning)."""
        pushed = self._push_forward()
        if isinstance(pushed, BaseException):
            refusal = f"forward-mode AD is not available for an op in {self.model.name}: {culprit(pushed)}"
            if self.method == "forward":
                raise RuntimeError(
                    f"{self.model.api}: {refusal}. Use method='auto' to fall back to reverse mode, or method='reverse'."
                ) from pushed
            self._fall_back(f"{refusal}; ")
            return None
        sens, missing, output = pushed
        lost = self.zeros.lost(sens, missing, "forward")
        if not lost:
            return sens, output
        if self.method == "forward":
            self.losses.give_up(
                lost_message(self.model, lost, "forward-mode AD", "Use method='auto'."), targets_of(lost)
            )
            return sens, output
        self._fall_back(lost_message(self.model, lost, "forward-mode AD", "")[len(self.model.api) + 2 :])
        return None

    def _push_forward(self) -> tuple[dict[str, Tensor], list[ResolvedTarget], Tensor] | BaseException:
        """Forward mode, stepping down (steered kernels, one tangent at a time) as ops refuse; the refusal where
        it cannot go on."""
        plan = self.plan
        while True:
            try:
                with forward_ad_kernels(plan.safe_kernels, rnn=plan.rnn):
                    return forward(self.model, self.resolved, self.tensors, self.chunk_size, plan.vectorise)
            except (NotImplementedError, RuntimeError) as error:
                if not is_unsupported(error):
                    raise
                if not plan.safe_kernels:
                    plan.safe_kernels = True  # fused kernels first: their composite versions have formulas
                elif plan.vectorise and len(self.resolved) > 1:
                    # torch.func refuses more than dual numbers do (an op without a vmap rule, a custom Function
                    # without setup_context, requires_grad_ inside the model): one tangent at a time first
                    plan.vectorise = False
                else:
                    return error
            self.rng.restore()

    def _fall_back(self, why: str) -> None:
        self.plan.reverse = True
        falling = "falling" if why.endswith("; ") else "Falling"  # after a clause, or after sentences
        warnings.warn(
            f"{self.model.api}: {why}{falling} back to batched reverse mode, which costs a backward pass per chunk of "
            "output elements; pass method='reverse' to skip the forward attempt.",
            UserWarning,
            stacklevel=6,
        )

    def _reverse_mode(self) -> Differentiated:
        """Per-sample reverse mode where the model is separable (``method="reverse"``), else batched."""
        unfaithful = _reverse_unfaithful(self.plan, self.resolved, self.tensors)
        if unfaithful is not None:
            hint = (
                "Use method='auto' or 'forward'."
                if self.method == "reverse"
                else "Forward mode, which would be exact, cannot run this model (see the warning above); set "
                "scale_grad_by_freq=False on that module while measuring (it changes only training's gradients)."
            )
            raise ValueError(f"{self.model.api}: {unfaithful} {hint}")
        if self.method == "reverse" and self.plan.per_sample:
            try:  # separable models: one backward pass per output element of a sample, vectorised over samples
                sens, output = self._per_sample()
            except Exception as error:  # noqa: BLE001 - any refusal (vmap, a layer that needs a batch): batched
                self.plan.per_sample = False
                _LOG.debug("%s: per-sample reverse mode refused (%s); batched reverse", self.model.name, culprit(error))
            else:
                self._give_up_on(
                    self.zeros.lost(sens, [], "per-sample reverse"), "reverse-mode AD", "Use method='auto'."
                )
                return sens, output
        self.rng.restore()
        sens, missing, output = reverse(self.model, self.resolved, self.tensors, self.chunk_size)
        self._give_up_on(self.zeros.lost(sens, missing, "reverse"), "either AD mode", "")
        return sens, output

    def _give_up_on(self, lost: list[Lost], mode: str, hint: str) -> None:
        if lost:
            self.losses.give_up(lost_message(self.model, lost, mode, hint), targets_of(lost))

    def _per_sample(self) -> Differentiated:
        """Per-sample reverse mode, checked against batched reverse mode and the batched output at the first call
        of each signature and batch layout; raises where the model is not per-sample on these inputs."""
        checked = (self.key, _batch_layout(self.model))
        check = checked not in self.plan.per_sample_checked
        if check and not per_sample_agrees(self.model, self.resolved, self.tensors):
            raise NotPerSample("per-sample reverse mode disagrees with batched reverse mode on the first samples")
        self.rng.restore()
        sens, _, output = per_sample_reverse(self.model, self.resolved, self.tensors, self.chunk_size, check=check)
        self.plan.per_sample_checked.add(checked)
        return sens, output


def _reverse_unfaithful(plan: Plan, resolved: Sequence[ResolvedTarget], tensors: dict[str, Tensor]) -> str | None:
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


def _batch_layout(model: Model) -> tuple[Any, ...]:
    """What decides which inputs per-sample reverse mode takes for batched (their first dimensions) and whether
    the model mixes samples (train or eval mode of every submodule)."""
    leaves, _ = tree_flatten(model.inputs)
    sizes = tuple(x.shape[0] if isinstance(x, Tensor) and x.dim() > 0 else None for x in leaves)
    return sizes, tuple(m.training for m in model.module.modules())


def _sharded(
    sharded: ShardedModel,
    method: Method,
    chunk_size: int | None,
    on_check: Callable[[list[Mismatch]], None] | None,
    losses: Losses,
) -> Differentiated:
    """Forward mode for a model sharded with FSDP2: the tangents are given inside the forward of each target's
    managing module (``_sharded.py``). Every process runs the same evaluations (each is a collective)."""
    model, plan = sharded.model, sharded.model.plan
    if method == "reverse":
        raise ValueError(
            f"{model.api}: method='reverse' is not available for a model sharded with FSDP (fully_shard); use "
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
                f"{model.api}: forward-mode AD is not available for an op in {model.name}: {culprit(error)}. Reverse "
                "mode, the usual fallback, is not available for a model sharded with FSDP."
            ) from error
    todo = [t for t in missing if t.label not in plan.independent]
    if todo:
        differences = ShardedFiniteDifferences(sharded)
        moved = {t.label: differences.depends(t, sens[t.label].dtype) for t in todo}
        # every process must take the same way on: each evaluation of a sharded model is a collective
        lost = [(t, moved[t.label]) for t in todo if _any_process(moved[t.label] is not None, output.device)]
        if lost:
            losses.give_up(lost_message(model, lost, "forward-mode AD", ""), targets_of(lost))
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
