"""What the engine learns about a module from differentiating it, so that failed attempts and measurements are
paid once: :class:`Plan`, one per module, and :class:`Plans`, which holds them for the caller.

Nothing here is process-wide: a :class:`Plans` belongs to whoever passes it (``per_sample_sensitivities(...,
plans=...)``; each ``SensitivityMonitor`` owns one), and :data:`DEFAULT_PLANS` is the one the function uses when
given none. A forced ``method="forward"`` or ``"reverse"`` always tries that mode, whatever a plan says.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: ``timer(what, fn) -> (fn(), seconds)``: how ``method="auto"`` times its probes (``what`` names the probe:
#: ``"forward"``, ``"per-sample reverse, one sample"`` or ``"per-sample reverse"``).
Timer = Callable[[str, Callable[[], Any]], tuple[Any, float]]


@dataclass
class Plan:
    """What worked for one module, and what it was seen to do.

    Attributes:
        rnn: the module holds an ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU`` (their fused kernels are steered around).
        frequency_scaled: embeddings with ``scale_grad_by_freq``, by name: reverse mode does not give the
            derivative of their weight.
        safe_kernels: fused kernels without forward-mode formulas were met (attention, RNNs): steer them.
        vectorise: ``vmap`` over ``jvp`` works; once it refused, one tangent at a time.
        reverse: forward mode cannot run this module: ``method="auto"`` goes to reverse mode.
        per_sample: per-sample reverse mode may work (false once the module mixed samples or refused vmap).
        independent: labels of targets whose value reaches no output element at all.
        choices: per signature (function, targets, input structure): the mode ``"auto"`` measured cheaper.
        per_sample_checked: signatures and batch layouts on which per-sample reverse mode was checked.
        carried: per signature and mode, the targets that mode has given a nonzero derivative.
        updates_inputs: whether the module's forward updates its inputs in place (``None``: not known yet).
        backward_inside: whether the module's forward runs a backward pass (``torch.autograd.grad``).
    """

    rnn: bool = False
    frequency_scaled: list[tuple[str, nn.Embedding | nn.EmbeddingBag]] = field(default_factory=list)
    safe_kernels: bool = False
    vectorise: bool = True
    reverse: bool = False
    per_sample: bool = True
    independent: set[str] = field(default_factory=set)
    choices: dict[tuple[Any, ...], str] = field(default_factory=dict)
    per_sample_checked: set[tuple[Any, ...]] = field(default_factory=set)
    carried: dict[tuple[Any, ...], set[str]] = field(default_factory=dict)
    updates_inputs: bool | None = None
    backward_inside: bool = False

    @classmethod
    def of(cls, module: nn.Module) -> Plan:
        """A fresh plan, with what the module holds looked up once."""
        embeddings = [
            (name, m)
            for name, m in module.named_modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.scale_grad_by_freq
        ]
        return cls(rnn=any(isinstance(m, nn.RNNBase) for m in module.modules()), frequency_scaled=embeddings)


class Plans:
    """The plans of the modules a caller differentiates, kept as long as each module lives.

    Args:
        timer: how ``method="auto"`` times its probes when it chooses between forward and per-sample reverse
            mode (:data:`Timer`); ``None``: wall-clock time, with the device synchronised. Pass one to make the
            choice reproducible (tests, benchmarks).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_sensitivity import Plans, per_sample_sensitivities
        >>> plans, net = Plans(), nn.Linear(3, 1)
        >>> _ = per_sample_sensitivities(net, "bias[0]", torch.ones(2, 3), plans=plans)
        >>> net in plans, len(plans)
        (True, 1)
        >>> plans.clear()
        >>> net in plans
        False
    """

    def __init__(self, timer: Timer | None = None) -> None:
        self.timer: Timer = wall_clock if timer is None else timer
        self._plans: weakref.WeakKeyDictionary[nn.Module, Plan] = weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict[str, Any]:
        """Only the timer: what was learned is about modules of this process (``ddp_spawn`` pickles callbacks)."""
        return {"timer": self.timer}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["timer"])  # type: ignore[misc]

    def __getitem__(self, module: nn.Module) -> Plan:
        """The module's plan, made on first use."""
        plan = self._plans.get(module)
        if plan is None:
            plan = self._plans[module] = Plan.of(module)
        return plan

    def __contains__(self, module: object) -> bool:
        return isinstance(module, nn.Module) and module in self._plans

    def __len__(self) -> int:
        return len(self._plans)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(list(self._plans))

    def forget(self, module: nn.Module) -> None:
        """Drop what was learned about ``module`` (a no-op when nothing was)."""
        self._plans.pop(module, None)

    def clear(self) -> None:
        """Drop every plan."""
        self._plans.clear()

    def __repr__(self) -> str:
        return f"Plans({len(self)} modules)"


def wall_clock(what: str, fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and the seconds it took; the first per-sample reverse probe is run once untimed first (a warm-up;
    the forward probe ran just before, and the second reverse probe after the first). Accelerators in use are
    synchronised around the timed run."""
    if what == "per-sample reverse, one sample":
        fn()
    _synchronize()
    start = time.perf_counter()
    result = fn()
    _synchronize()
    return result, time.perf_counter() - start


def _synchronize() -> None:
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.synchronize()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.synchronize()


#: The plans :func:`~lightning_sensitivity.per_sample_sensitivities` uses when it is given none.
DEFAULT_PLANS = Plans()
