"""Inputs as targets: one element of every sample's input, such as the initial condition of an ODE.

A target names a per-sample slice of a tensor in the call's arguments (``args[0][:, 3]``, ``kwargs['y0']``) or,
in the monitor, in the batch (``batch[0][:, 3]``, ``batch['y0']``, ``batch['x'][:, 2, 5]``). The path goes
through tuples, lists and dicts; the last subscript is the per-sample index, whose first item is ``:`` (the
samples): ``[:, 3]`` is feature 3 of every sample; no index names a ``[B]`` tensor, one scalar per sample.
Slices and ``...`` after the ``:`` expand, row-major, to one target per element. The result is dy_i/dx_ij:
sample i's output with respect to sample i's own input.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

from torch import Tensor

from lightning_sensitivity._targets import Index, ResolvedTarget, _elements, _item

#: Where an input target's path starts: the function's arguments, or the monitor's batch.
ROOTS = ("args", "kwargs", "batch")
Key = int | str


def is_input(text: str, roots: Container[str] = ROOTS) -> bool:
    """Whether ``text`` is written as an input target (``args[...]``, ``kwargs[...]``, ``batch[...]``)."""
    stripped = text.strip()
    head = stripped.split("[", 1)[0].strip()
    return head in roots and ("[" in stripped or stripped == head)


def parse(text: str, api: str) -> tuple[str, tuple[Key, ...], tuple[Index, ...] | None]:
    """``(root, keys, index)``: ``batch['x'][:, 2, 5]`` is ``("batch", ("x",), (slice(None), 2, 5))``."""
    stripped = text.strip()
    root, rest = stripped.split("[", 1)[0].strip(), stripped[len(stripped.split("[", 1)[0]) :]
    parts = _subscripts(rest.strip(), text, api)
    keys: list[Key] = []
    index: tuple[Index, ...] | None = None
    for n, part in enumerate(parts):
        inner = part.strip()
        if ":" in inner or "," in inner or inner == "...":
            if n != len(parts) - 1:
                raise ValueError(f"{api}: in target {text!r}, the per-sample index [{inner}] must come last.")
            items = [p.strip() for p in inner.split(",")]
            try:
                index = tuple(_item(p) for p in items)
            except ValueError:
                raise ValueError(f"{api}: cannot read the per-sample index [{inner}] of target {text!r}.") from None
            if index[0] != slice(None):
                raise ValueError(f"{api}: the first index of target {text!r} must be ':' alone (the samples).")
        elif inner[:1] in "'\"" and inner[-1:] == inner[:1] and len(inner) >= 2:
            keys.append(inner[1:-1])
        else:
            try:
                keys.append(int(inner))
            except ValueError:
                raise ValueError(
                    f"{api}: cannot read [{inner}] in target {text!r}: write an element of a tuple or list ([0]), "
                    "a key of a dict (['y0']), or the per-sample index last, starting with ':' ([:, 3])."
                ) from None
    if root != "batch" and not keys:
        raise ValueError(f"{api}: target {text!r} names all of {root}; name one argument, such as {root}[0].")
    return root, tuple(keys), index


def _subscripts(rest: str, text: str, api: str) -> list[str]:
    """The contents of ``[...][...]``, quotes respected."""
    parts, i = [], 0
    while i < len(rest):
        if rest[i] != "[":
            raise ValueError(f"{api}: cannot parse target {text!r}: expected '[' at {rest[i:]!r}.")
        j, quote = i + 1, ""
        while j < len(rest) and (rest[j] != "]" or quote):
            if rest[j] in "'\"":
                quote = "" if quote == rest[j] else quote or rest[j]
            j += 1
        if j == len(rest):
            raise ValueError(f"{api}: cannot parse target {text!r}: a '[' is not closed.")
        parts.append(rest[i + 1 : j])
        i = j + 1
        while i < len(rest) and rest[i] == " ":
            i += 1
    return parts


def path_text(root: str, keys: tuple[Key, ...]) -> str:
    """``batch['x'][0]``: a path, canonically written."""
    return root + "".join(f"[{key!r}]" if isinstance(key, str) else f"[{key}]" for key in keys)


def resolve(text: str, arguments: dict[str, Any], api: str) -> list[ResolvedTarget]:
    """The targets an input target names in ``arguments`` (``{"args": ..., "kwargs": ...}`` or
    ``{"batch": ...}``), one per element after the sample dimension, with their path and canonical label.

    Raises:
        ValueError: no such element of the batch or arguments, a tensor without a sample dimension, an element
            named without its per-sample index; IndexError: a feature index out of range; TypeError: not a
            tensor, or an integer or bool tensor.
    """
    root, keys, index = parse(text, api)
    if root not in arguments:
        raise ValueError(f"{api}: target {text!r} starts at {root!r}; here the targets start at {sorted(arguments)}.")
    value: Any = arguments[root]
    for depth, key in enumerate(keys):
        where = path_text(root, keys[:depth])
        value = _step(value, key, where, text, api)
    name = path_text(root, keys)
    if not isinstance(value, Tensor):
        raise TypeError(f"{api}: target {text!r} names {name}, a {type(value).__name__}, not a tensor.")
    if not value.is_floating_point():
        raise TypeError(
            f"{api}: target {text!r} names {name}, a tensor of dtype {value.dtype}; derivatives exist only for "
            "floating-point inputs."
        )
    if value.dim() == 0:
        raise ValueError(
            f"{api}: target {text!r} names {name}, a 0-dim tensor: an input target needs a first dimension that "
            "indexes samples."
        )
    if index is None and value.dim() > 1:
        example = f"{name}[:, {', '.join('0' for _ in value.shape[1:])}]"
        raise ValueError(
            f"{api}: target {text!r} names {name}, which holds {value[0].numel()} elements per sample (shape "
            f"{tuple(value.shape)}); pick one per sample with an index, such as {example!r}, or all with "
            f"'{name}[:, ...]'."
        )
    sample = value[0] if value.shape[0] > 0 else value.new_empty(value.shape[1:])
    elements = [()] if index is None else _elements(text, f"each sample of {name}", sample, index[1:], api)
    path = (root, *keys)
    return [
        ResolvedTarget(
            name=name, index=e, label=f"{name}[:, {', '.join(map(str, e))}]" if e else name, text=text, path=path
        )
        for e in elements
    ]


def _step(value: Any, key: Key, where: str, text: str, api: str) -> Any:
    if isinstance(value, dict):
        if key not in value:
            raise ValueError(f"{api}: target {text!r}: {where} has no key {key!r}; its keys are {list(value)}.")
        return value[key]
    if isinstance(value, (tuple, list)) and isinstance(key, int):
        if not -len(value) <= key < len(value):
            raise ValueError(f"{api}: target {text!r}: {where} holds {len(value)} elements; [{key}] is not one.")
        return value[key]
    raise ValueError(
        f"{api}: target {text!r}: {where} is a {type(value).__name__}, which has no element [{key!r}] (paths go "
        "through tuples, lists and dicts)."
    )


def locate(tensor: Tensor, arguments: dict[str, Any]) -> tuple[Key, ...] | None:
    """The path of ``tensor`` (by identity) in ``arguments``, such as ``("args", 0, "x")``; ``None``: not there."""

    def walk(value: Any, path: tuple[Key, ...]) -> tuple[Key, ...] | None:
        if value is tensor:
            return path
        if isinstance(value, dict):
            items: Any = value.items()
        else:
            items = enumerate(value) if isinstance(value, (tuple, list)) else ()
        for key, inner in items:
            found = walk(inner, (*path, key))
            if found is not None:
                return found
        return None

    return walk(arguments, ())


def fetch(arguments: dict[str, Any], path: tuple[Key, ...]) -> Any:
    """The value at ``path`` in ``arguments``."""
    value: Any = arguments
    for key in path:
        value = value[key]
    return value


def replaced(arguments: Any, path: tuple[Key, ...], new: Any) -> Any:
    """``arguments`` with the value at ``path`` replaced by ``new``: the containers along the path are copied
    (their types kept), nothing else."""
    if not path:
        return new
    key, rest = path[0], path[1:]
    if isinstance(arguments, dict):
        return type(arguments)({k: replaced(v, rest, new) if k == key else v for k, v in arguments.items()})
    items = [replaced(v, rest, new) if i == key % len(arguments) else v for i, v in enumerate(arguments)]
    return type(arguments)(*items) if hasattr(arguments, "_fields") else type(arguments)(items)
