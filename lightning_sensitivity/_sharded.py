"""Sensitivities of a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``, as Lightning's
``ModelParallelStrategy`` applies it in ``configure_model``).

A sharded parameter is a ``DTensor`` shard outside forward; FSDP all-gathers it into a plain parameter just
before the forward of the module that manages it and re-registers the shard afterwards. Swapping the sharded
parameter for a tangent-carrying tensor (as ``Model`` swaps tensors) therefore either crashes FSDP's lazy
initialisation or is overwritten by the all-gather: the tangent is lost. Here the replacement is made *inside*
that forward instead, from the gathered parameter, by a forward pre-hook registered after FSDP's own
(``prepend=False``; FSDP prepends its own): a dual tensor (one target), ``P`` plus the input of ``jvp``
scattered onto the targets' elements (several targets), or a copy with one element moved (finite
differences). The real parameters are never written, and no process ever holds more of the model than FSDP
itself gathers. Each evaluation counts the hooks that fired: a target whose module never ran its forward
raises instead of giving zeros. Buffers are not sharded: they are swapped by ``Model`` as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import jvp, vmap

from lightning_sensitivity._model import Model, RandomState, Result, fresh, writable
from lightning_sensitivity._modes import INDEPENDENT
from lightning_sensitivity._targets import ResolvedTarget
from lightning_sensitivity._verify import FiniteDifferences, stepped

try:  # public in torch >= 2.6
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - older torch: nothing can be an FSDP2 module
    FSDPModule = ()  # type: ignore[assignment,misc]
try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()  # type: ignore[assignment,misc]

Maker = Callable[[Tensor], Tensor]


def uses_fsdp(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule went through FSDP2's ``fully_shard`` (or holds ``DTensor``
    parameters)."""
    return any(isinstance(m, FSDPModule) for m in module.modules()) or any(
        isinstance(p, DTensor) for p in module.parameters()
    )


class SensitivityShardingError(RuntimeError):
    """A target of a sharded model cannot be given a tangent (its module's forward never ran, or tensor
    parallelism keeps it sharded inside the forward)."""


@dataclass(frozen=True)
class _Site:
    """Where a parameter lives: ``owner._parameters[attr]`` (and every alias of a tied parameter), gathered by
    the FSDP module ``manager`` before its forward; ``shape`` is the global shape."""

    name: str
    owner: nn.Module
    attr: str
    manager: nn.Module
    shape: torch.Size
    aliases: tuple[tuple[nn.Module, str], ...]


def _locate(root: nn.Module, name: str) -> _Site:
    """The site of parameter ``name``: its managing FSDP module is the deepest ``FSDPModule`` on the path from
    ``root`` to its owner (``fully_shard`` is applied bottom-up, each call taking the parameters no module below
    it manages); a parameter no FSDP module manages is replaced in its owner's own forward."""
    prefix, _, attr = name.rpartition(".")
    owner = root.get_submodule(prefix)
    manager = root if isinstance(root, FSDPModule) else None
    module = root
    for part in prefix.split(".") if prefix else []:
        module = module.get_submodule(part)
        if isinstance(module, FSDPModule):
            manager = module
    param = owner._parameters[attr]
    assert param is not None  # ``name`` is one of ``root.named_parameters()``, which skips None entries
    aliases = [(owner, attr)]
    for full, p in root.named_parameters(remove_duplicate=False):
        if p is param and full != name:
            pre, _, a = full.rpartition(".")
            aliases.append((root.get_submodule(pre), a))
    return _Site(name, owner, attr, manager if manager is not None else owner, param.shape, tuple(aliases))


class _Replacements:
    """While active, and for the names in :attr:`make`, every forward of a target's managing module registers
    ``make[name](gathered)`` in place of the parameter FSDP has just gathered; :meth:`restore` puts the gathered
    one back where FSDP keeps a group gathered between forwards (the root). :attr:`fired` counts the
    replacements per name since :meth:`reset`.

    ``torch.func.jvp`` and dual numbers leave inference mode, but FSDP's all-gather buffers, once made by a
    forward in inference mode (``validation_step`` under ``trainer.validate``), refuse to be written outside
    it: a pre-hook placed before FSDP's gathers the group in the caller's inference mode first
    (``FSDPModule.unshard``), and FSDP's own pre-forward then finds it gathered.
    """

    def __init__(self, root: nn.Module, names: Sequence[str]) -> None:
        self.root = root
        self.sites = {name: _locate(root, name) for name in dict.fromkeys(names)}
        self.make: dict[str, Maker] = {}
        self.fired: dict[str, int] = {}
        self.inference = False
        self._handles: list[Any] = []
        self._current: dict[str, tuple[Tensor, Tensor]] = {}  # name -> (replacement, gathered parameter)

    def __enter__(self) -> _Replacements:
        self.inference = torch.is_inference_mode_enabled()
        for module in self.root.modules():
            if isinstance(module, FSDPModule):
                self._handles.append(module.register_forward_pre_hook(self._gather_in_mode, prepend=True))
        by_manager: dict[nn.Module, list[_Site]] = {}
        for site in self.sites.values():
            by_manager.setdefault(site.manager, []).append(site)
        for manager, sites in by_manager.items():
            self._handles.append(manager.register_forward_pre_hook(self._hook(sites)))  # after FSDP's
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.make = {}
        self.restore()

    def _gather_in_mode(self, module: nn.Module, args: Any) -> None:
        if self.inference and not torch.is_inference_mode_enabled():
            with torch.inference_mode():
                module.unshard()  # type: ignore[operator]

    def _hook(self, sites: list[_Site]) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            for site in sites:
                if site.name in self.make:
                    self._install(site, strict=True)

        return hook

    def reset(self, make: dict[str, Maker]) -> None:
        self.make = make
        self.fired = {name: 0 for name in make}

    def install_ready(self) -> None:
        """Before an evaluation: replace the parameters that FSDP already holds gathered (the root after its
        first forward), so that uses before the module's forward (``self.k * x + self(x)``) see them too."""
        for site in self.sites.values():
            if site.name in self.make:
                self._install(site, strict=False)

    def _install(self, site: _Site, strict: bool) -> None:
        registered: Tensor | None = site.owner._parameters[site.attr]
        current = self._current.get(site.name)
        if current is not None and registered is current[0]:
            registered = current[1]  # ours from earlier in this evaluation: the group stayed gathered
        if registered is None or isinstance(registered, DTensor) or registered.shape != site.shape:
            if not strict:
                return  # sharded now: the hook replaces it after FSDP's all-gather
            raise SensitivityShardingError(
                f"{site.name!r} is still sharded inside the forward of the module that should gather it: "
                "fully_shard was not applied bottom-up, or tensor parallelism keeps it a DTensor (not supported)."
            )
        replacement = self.make[site.name](registered)
        for module, attr in site.aliases:
            module._parameters[attr] = replacement  # type: ignore[assignment] # as FSDP itself does
        self._current[site.name] = (replacement, registered)
        self.fired[site.name] = self.fired.get(site.name, 0) + 1

    def restore(self) -> None:
        for name, (replacement, gathered) in self._current.items():
            for module, attr in self.sites[name].aliases:
                if module._parameters.get(attr) is replacement:
                    module._parameters[attr] = gathered  # type: ignore[assignment]
        self._current.clear()

    def check_fired(self) -> None:
        missing = [name for name, count in self.fired.items() if count == 0]
        if missing:
            raise SensitivityShardingError(
                f"the forward of the FSDP module that gathers {missing} never ran while the model was evaluated, so "
                "no tangent could be given to it. Call the sharded modules through their forward (self(x)); "
                "methods registered with register_fsdp_forward_method bypass module hooks and are not supported."
            )

    @contextlib.contextmanager
    def evaluation(self, make: dict[str, Maker]) -> Iterator[None]:
        """One evaluation of the model with ``make`` active; nothing made outlives it."""
        self.reset(make)
        try:
            self.install_ready()
            yield
        finally:
            self.restore()
            self.make = {}
        self.check_fired()


class ShardedModel:
    """The engine's ways for a sharded model: parameters replaced by hooks, buffers by ``Model``'s swap."""

    def __init__(self, model: Model, resolved: Sequence[ResolvedTarget], tensors: dict[str, Tensor]) -> None:
        self.model = model
        self.resolved = list(resolved)
        self.tensors = tensors
        params = {name for name, _ in model.module.named_parameters(remove_duplicate=False)}
        self.hooked = [name for name in dict.fromkeys(t.name for t in resolved) if name in params]
        self.replacements = _Replacements(model.module, self.hooked)
        #: the targets' values, read from the gathered parameters during the last evaluation ([K] tensors)
        self.theta: dict[str, Tensor] = {}

    def __enter__(self) -> ShardedModel:
        self.replacements.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.replacements.__exit__(*exc)

    def evaluate(self, make: dict[str, Maker], args: Any = None, kwargs: Any = None) -> Tensor:
        """The output with ``make[name]`` applied to each named tensor: inside the managing module's forward for
        a sharded parameter, before the call for a buffer."""
        hooked = {name: fn for name, fn in make.items() if name in self.hooked}
        swapped = {name: fn(self.tensors[name].detach()) for name, fn in make.items() if name not in self.hooked}
        with self.replacements.evaluation(hooked):
            out: Tensor = self.model(swapped, args=args, kwargs=kwargs)
        return out

    def _recording(self, name: str, fn: Maker) -> Maker:
        """``fn``, also keeping the values of the targets in ``name`` as it sees them (gathered)."""

        def make(p: Tensor) -> Tensor:
            base = p.detach()
            for target in self.resolved:
                if target.name == name:
                    self.theta[target.label] = base[target.index].clone()
            return fn(p)

        return make

    # ---- the ways ---------------------------------------------------------------------------------------------

    def forward(self, chunk_size: int | None, vectorise: bool) -> Result:
        """Forward mode: dual numbers for one target, ``vmap`` over ``jvp`` (or one ``jvp`` at a time) through
        ``P + scatter(delta)`` for several."""
        resolved = self.resolved
        rng = RandomState(self.model.device)
        out: dict[str, Tensor] = {}
        missing: list[ResolvedTarget] = []
        output: Tensor | None = None
        step = len(resolved) if chunk_size is None else chunk_size
        for start in range(0, len(resolved), step):
            part = resolved[start : start + step]
            rng.restore()
            if len(part) == 1:
                output, tangent = self._dual(part[0])
                columns = None if tangent is None else tangent.unsqueeze(0)
            else:
                output, columns = self._vmap(part, vectorise)
            if columns is None:
                missing.extend(part)
                assert output is not None
                columns = torch.zeros_like(output).unsqueeze(0).expand(len(part), *output.shape)
            for target, column in zip(part, columns, strict=True):
                out[target.label] = column.detach()
        assert output is not None
        return out, missing, output

    def _dual(self, target: ResolvedTarget) -> tuple[Tensor, Tensor | None]:
        grad = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()

        def make(p: Tensor) -> Tensor:
            with torch.enable_grad():
                leaf = writable(p.detach()).requires_grad_(True)
                tangent = torch.zeros_like(leaf)
                tangent[target.index] = 1
                dual: Tensor = fwAD.make_dual(leaf, tangent)  # type: ignore[no-untyped-call]
                return dual

        with torch.inference_mode(False), fwAD.dual_level(), torch.set_grad_enabled(grad):
            args, kwargs = writable(self.model.args), writable(self.model.kwargs)
            output = self.evaluate({target.name: self._recording(target.name, make)}, args, kwargs)
            primal, tangent = fwAD.unpack_dual(output)  # type: ignore[no-untyped-call]
            return primal.detach(), None if tangent is None else tangent.detach()

    def _vmap(self, part: Sequence[ResolvedTarget], vectorise: bool) -> tuple[Tensor, Tensor | None]:
        slots: dict[str, list[int]] = {}
        for k, target in enumerate(part):
            slots.setdefault(target.name, []).append(k)
        first = self.tensors[part[0].name]
        delta0 = torch.zeros(len(part), dtype=first.dtype, device=first.device)
        eye = torch.eye(len(part), dtype=first.dtype, device=first.device)
        current: dict[str, Tensor] = {}

        def maker(name: str) -> Maker:
            ks = slots[name]
            rows = [part[k].index for k in ks]

            def make(p: Tensor) -> Tensor:
                base = p.detach()
                if base.is_inference() and not torch.is_inference_mode_enabled():
                    base = base.clone()
                moved = current["delta"][ks].to(base.dtype)  # the parameter's dtype under mixed precision
                if base.dim() == 0:
                    return base + moved.sum()
                index = tuple(torch.tensor(c, device=base.device) for c in zip(*rows, strict=True))
                return base.index_put(index, moved, accumulate=True)

            return self._recording(name, make)

        makers = {name: maker(name) for name in slots}

        def f(delta: Tensor) -> Tensor:
            current["delta"] = delta
            try:
                return self.evaluate(makers)
            finally:
                current.clear()

        def output_and_tangent(tangent: Tensor) -> tuple[Tensor, Tensor]:
            return cast("tuple[Tensor, Tensor]", jvp(f, (delta0,), (tangent,), strict=True))

        try:
            if vectorise:
                # out_dims=(None, 0): one output shared by all rows (valid; torch's annotation says int per output)
                batched = vmap(output_and_tangent, randomness="same", out_dims=(None, 0))  # type: ignore[arg-type]
                output, columns = batched(eye)
            else:
                pairs = [output_and_tangent(eye[k]) for k in range(len(part))]
                output, columns = pairs[0][0], torch.stack([tangent for _, tangent in pairs])
        except RuntimeError as error:
            if INDEPENDENT not in str(error):
                raise
            return self.evaluate({}).detach(), None  # in the caller's grad mode: the model may need it
        return output.detach(), columns

    def values(self) -> dict[str, Tensor]:
        """Each target's value, read from the gathered parameter during the last evaluation (no collective)."""
        if len(self.theta) < len(self.resolved):
            self.evaluate({name: self._recording(name, lambda p: p) for name in self.hooked})
            for target in self.resolved:
                if target.name not in self.hooked:
                    self.theta[target.label] = self.tensors[target.name].detach()[target.index]
        return self.theta


class ShardedFiniteDifferences(FiniteDifferences):
    """Finite differences whose moved element is set inside the managing module's forward."""

    def __init__(self, sharded: ShardedModel) -> None:
        super().__init__(sharded.model, sharded.tensors)
        self.sharded = sharded

    def evaluate(self, replaced: dict[str, Tensor]) -> Tensor:
        assert not replaced, "sharded models are moved through hooks"
        return self._evaluate_with({})

    def _evaluate_with(self, make: dict[str, Maker]) -> Tensor:
        with self.rng.replayed():
            out = self.sharded.evaluate(make, args=fresh(self.args), kwargs=fresh(self.kwargs))
        return out.detach().double()

    def moved(self, target: ResolvedTarget) -> tuple[Tensor, Tensor, float, float]:
        steps: dict[int, float] = {}

        def mover(sign: int) -> Maker:
            def make(p: Tensor) -> Tensor:  # the step of the unsharded check, from the gathered parameter
                down, up, steps[-1], steps[1] = stepped(p, target.index)
                return down if sign < 0 else up

            return make

        down = self._evaluate_with({target.name: mover(-1)})
        up = self._evaluate_with({target.name: mover(1)})
        return down, up, steps.get(-1, 0.0), steps.get(1, 0.0)
