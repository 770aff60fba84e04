"""Contexts that make a module's ops differentiable, and exactly so, while the engine runs it.

- :func:`forward_ad_kernels` steers ops away from fused kernels that have no forward-mode formula (oneDNN
  and cuDNN RNN kernels, the attention fast paths, fused SDPA kernels), restoring every flag after.
- :func:`eager` runs ``torch.compile``'d code eagerly: a compiled region can drop a tangent without a word.
- :func:`uncached` computes parametrized tensors afresh inside ``torch.nn.utils.parametrize.cached()``.
- :class:`BatchNormByOps` computes an evaluation-mode batch norm by elementary ops, so that its running
  statistics carry a derivative (torch's own formulas treat them as constants).
- :class:`DifferentiableGrad` makes a derivative that the model computes inside ``forward`` (forces from an
  energy, by ``torch.autograd.grad``) differentiable in reverse mode.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _NormBase
from torch.overrides import TorchFunctionMode

from lightning_sensitivity._targets import ResolvedTarget

_RUNNING_STATS = ("running_mean", "running_var")


def _current(flags: Any, names: Sequence[str]) -> dict[str, Any]:
    """The present values of the settings that ``flags(...)`` would otherwise reset to its defaults."""
    params = inspect.signature(flags.flags).parameters
    return {name: getattr(flags, name) for name in names if name in params and hasattr(flags, name)}


@contextlib.contextmanager
def forward_ad_kernels(enabled: bool, rnn: bool = True) -> Iterator[None]:
    """Steer ops away from fused kernels that have no forward-mode formula, restoring every flag after.

    With ``rnn``, oneDNN (CPU) and cuDNN (CUDA) are turned off, whose RNN kernels (``nn.LSTM``, ``nn.GRU``) have
    no forward-mode formula; only modules holding an RNN need that, since it also slows convolutions. Always:
    the ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` fast path (taken when grad is off) and the
    fused kernels of ``scaled_dot_product_attention`` give way to composite ops, which forward mode can
    differentiate; and ``F.silu`` and ``F.mish`` are computed by elementary ops (:class:`Composites`), whose
    backward passes have forward-mode formulas (``aten::silu_backward`` and ``aten::mish_backward`` have none:
    a model that differentiates inside ``forward``, such as an ML potential, needs them).
    """
    if not enabled:
        yield
        return
    mha = torch.backends.mha
    fastpath = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        with contextlib.ExitStack() as stack:
            if rnn:
                mkldnn, cudnn = torch.backends.mkldnn, torch.backends.cudnn
                stack.enter_context(
                    mkldnn.flags(enabled=False, **_current(mkldnn, ("deterministic", "allow_tf32", "fp32_precision")))
                )
                names = ("benchmark", "benchmark_limit", "deterministic", "allow_tf32", "fp32_precision")
                stack.enter_context(cudnn.flags(enabled=False, **_current(cudnn, names)))
            stack.enter_context(_math_attention())
            stack.enter_context(Composites())
            yield
    finally:
        mha.set_fastpath_enabled(fastpath)


def _math_attention() -> contextlib.AbstractContextManager[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def has_rnn(module: nn.Module) -> bool:
    """Whether ``module`` holds an ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``."""
    return any(isinstance(m, nn.RNNBase) for m in module.modules())


def eager() -> contextlib.AbstractContextManager[Any]:
    """Run ``torch.compile``'d modules and functions eagerly (their original Python code) while active.

    Inside a compiled region a forward-mode tangent can be dropped without an error, and every new batch shape
    or dual tensor would cost a compilation; the eager code computes the same function.
    """
    if "torch._dynamo" not in sys.modules:  # nothing was compiled in this process (and importing costs seconds)
        return contextlib.nullcontext()
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:  # torch < 2.6: no compiled code can be told to run eagerly; run it as it is
        return contextlib.nullcontext()
    return cast("contextlib.AbstractContextManager[Any]", set_stance("force_eager"))


@contextlib.contextmanager
def uncached() -> Iterator[None]:
    """Compute parametrized tensors (``torch.nn.utils.parametrize``) afresh while active, also where the caller
    is inside ``parametrize.cached()``: a cached weight was computed before the engine gave the originals a
    tangent or a step, so it would carry neither (the derivative would come out as zero). The cache itself is
    left as it is."""
    from torch.nn.utils import parametrize

    depth = getattr(parametrize, "_cache_enabled", 0)
    if not depth:
        yield
        return
    parametrize._cache_enabled = 0
    try:
        yield
    finally:
        parametrize._cache_enabled = depth


def running_statistics(module: nn.Module, resolved: Sequence[ResolvedTarget], api: str) -> bool:
    """Whether a target is a buffer, such as a normalisation layer's running statistic, which torch's batch and
    instance norm kernels take as a constant (see :class:`BatchNormByOps`); a ``ValueError`` for a running
    statistic of a normalisation layer in training mode, whose output does not depend on it."""
    found = False
    for target in resolved:
        if target.is_input:
            continue
        owner_name, _, attr = target.name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if attr not in dict(owner.named_buffers(recurse=False)):
            continue
        found = True
        if isinstance(owner, _NormBase) and attr in _RUNNING_STATS and owner.training:
            where = f"{type(owner).__name__} {owner_name!r}" if owner_name else type(owner).__name__
            raise ValueError(
                f"{api}: target {target.label!r} is a running statistic of {where}, which is in training mode: it "
                "normalises with the statistics of its input, so the output does not depend on its running "
                "statistics. Call .eval() on the model (Lightning's validation does) to differentiate through the "
                "running statistics."
            )
    return found


class BatchNormByOps(TorchFunctionMode):
    """While active, ``F.batch_norm`` in evaluation mode, and ``F.instance_norm`` with running statistics, are
    computed as ``(x - running_mean) / sqrt(running_var + eps) * weight + bias`` by elementary ops, so forward
    and reverse mode both differentiate them with respect to the running statistics. Other calls pass through
    unchanged.
    """

    _PARAMETERS = {
        F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
        F.instance_norm: (
            "input",
            "running_mean",
            "running_var",
            "weight",
            "bias",
            "use_input_stats",
            "momentum",
            "eps",
        ),
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        names = self._PARAMETERS.get(func)
        if names is None:
            return func(*args, **kwargs)
        params = dict(zip(names, args, strict=False)) | kwargs
        mean, var = params.get("running_mean"), params.get("running_var")
        # the batch's (or sample's) own statistics: F.batch_norm's `training` is False by default, F.instance_norm's
        # `use_input_stats` True
        if params.get(names[5], func is F.instance_norm) or mean is None or var is None:
            return func(*args, **kwargs)
        x: Tensor = params["input"]
        shape = (1, -1) + (1,) * (x.dim() - 2)  # broadcast over channels, dimension 1
        y = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + params.get("eps", 1e-5))
        if params.get("weight") is not None:
            y = y * params["weight"].reshape(shape)
        if params.get("bias") is not None:
            y = y + params["bias"].reshape(shape)
        return y


class DifferentiableGrad(TorchFunctionMode):
    """While active, ``torch.autograd.grad`` called by the model builds the graph of the derivative it computes
    (``create_graph=True``, ``retain_graph=True``), so that reverse mode can differentiate through it: an ML
    potential's forces, ``-autograd.grad(E, R, create_graph=self.training)``, carry no graph in eval mode. The
    values are the same; forward mode needs no graph (its tangents go through the backward pass itself)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is torch.autograd.grad:
            bound = _GRAD_SIGNATURE.bind(*args, **kwargs).arguments
            bound.update(create_graph=True, retain_graph=True)
            return func(**bound)
        return func(*args, **kwargs)


_GRAD_SIGNATURE = inspect.signature(torch.autograd.grad)


class Composites(TorchFunctionMode):
    """While active, ``F.silu`` is ``x * sigmoid(x)`` and ``F.mish`` is ``x * tanh(softplus(x))``: the same values
    (up to rounding), by ops whose backward formulas forward mode can differentiate."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.silu or func is F.mish:
            x, inplace = args[0], (args[1] if len(args) > 1 else kwargs.get("inplace", False))
            y = x * torch.sigmoid(x) if func is F.silu else x * torch.tanh(F.softplus(x))
            return x.copy_(y) if inplace else y
        return func(*args, **kwargs)
