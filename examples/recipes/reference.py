"""What every recipe checks itself against, in plain torch: the loop of one ``torch.autograd.grad`` per output
element (the method the monitor replaces), and that the model was left exactly as it was.

Each recipe builds a library's own model on tiny synthetic data, runs the monitor with the recipe's few lines,
and ends with :func:`check`, which prints one line ``RECIPE <name>: OK`` (or raises).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn


def split_label(label: str) -> tuple[str, tuple[int, ...]]:
    """``"net.0.weight[2, 1]"`` -> ``("net.0.weight", (2, 1))``; ``"k"`` -> ``("k", ())``."""
    if not label.endswith("]"):
        return label, ()
    start = label.rindex("[")
    return label[:start], tuple(int(i) for i in label[start + 1 : -1].split(","))


def loop_reference(
    model: nn.Module,
    labels: list[str],
    batches: Iterable[Any],
    output: Callable[[nn.Module, Any], Tensor],
    clone: Callable[[nn.Module], nn.Module] = copy.deepcopy,
) -> dict[str, Tensor]:
    """``{label: every d output / d target}``, over every element of ``output(model, batch)`` of every batch, in
    order, by one ``torch.autograd.grad`` per element, on a copy of ``model`` (``clone``: how to copy it, for a
    model that ``deepcopy`` refuses)."""
    copied = clone(model)
    named = dict([*copied.named_parameters(remove_duplicate=False), *copied.named_buffers(remove_duplicate=False)])
    values: dict[str, list[Tensor]] = {label: [] for label in labels}
    for batch in batches:
        for label in labels:
            name, index = split_label(label)
            tensor = named[name]
            with torch.enable_grad():
                requires_grad = tensor.requires_grad
                tensor.requires_grad_(True)
                out = output(copied, batch).reshape(-1)
                for e in range(out.numel()):
                    (g,) = torch.autograd.grad(out[e], tensor, retain_graph=True, allow_unused=True)
                    values[label].append(torch.zeros((), dtype=out.dtype) if g is None else g[index].detach())
                tensor.requires_grad_(requires_grad)
    return {label: torch.stack(v).double() for label, v in values.items()}


def input_reference(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    output: Callable[[nn.Module, Any], Tensor],
    key: str,
    column: int,
) -> Tensor:
    """Every ``d output[i, ...] / d batch[key][i, column]``, each sample's output with respect to its own input, over
    every batch (a dict) in order, by one ``torch.autograd.grad`` per output element, on a copy of ``model``."""
    copied = copy.deepcopy(model)
    values = []
    for batch in batches:
        x = batch[key].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = output(copied, {**batch, key: x})
            for i in range(out.shape[0]):
                for element in out[i].reshape(-1):
                    (g,) = torch.autograd.grad(element, x, retain_graph=True)
                    values.append(g[i, column].detach())
    return torch.stack(values).double()


def snapshot(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """Every Parameter and buffer, by every name it has: the object and a copy of its value."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name: (tensor, tensor.detach().clone()) for name, tensor in named}


def assert_untouched(model: nn.Module, before: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Each name still holds the same object, with the same value, bit for bit."""
    after = snapshot(model)
    assert after.keys() == before.keys(), sorted(set(after) ^ set(before))
    for name, (tensor, value) in before.items():
        assert after[name][0] is tensor, f"{name} holds another tensor than before"
        assert torch.equal(after[name][1], value), f"{name} changed value"


def check(name: str, summary: dict[str, dict[str, float]], reference: dict[str, Tensor], rtol: float = 1e-4) -> None:
    """The monitor's ``summary()`` against the reference's values: count, mean, mean |value| (μ*), min and max,
    within ``rtol`` of the target's largest |value|; prints ``RECIPE <name>: OK`` and the numbers."""
    lines = []
    for label, values in reference.items():
        stats = summary[label]
        scale = max(values.abs().max().item(), 1e-30)
        expected = {
            "count": values.numel(),
            "mean": values.mean().item(),
            "abs_mean": values.abs().mean().item(),
            "min": values.min().item(),
            "max": values.max().item(),
        }
        for key, value in expected.items():
            tolerance = 0 if key == "count" else rtol * scale
            if not math.isclose(stats[key], value, rel_tol=0, abs_tol=tolerance):
                raise AssertionError(f"{name}: {label} {key}: the monitor gave {stats[key]!r}, the loop {value!r}")
        lines.append(f"  {label}: mean {stats['mean']:.6g}, mean |value| {stats['abs_mean']:.6g} ({values.numel()})")
    print(f"RECIPE {name}: OK, the monitor agrees with the loop of torch.autograd.grad")
    print("\n".join(lines))
