"""Parse, resolve and validate sensitivity targets.

A target names scalars inside a module: a parameter or buffer holding one element (``"C"``), one element of
a larger tensor (``"net.0.weight[3, -1]"``), every element (``"net.0.weight[...]"``) or a slice
(``"net.0.weight[3, :]"``, ``"w[:, 1:4]"``), expanding in row-major order to one target per element labelled
``name[i, j]``; and a glob (``"blocks.*.alpha"``, ``"correction.*.weight[...]"``) expands, in module order, to
every matching name. At most :data:`MAX_TARGETS` scalars in all. Every error about a bad target is raised here,
with the target's text, what was wrong and how to fix it.

Names are those of ``module.named_parameters()`` and ``module.named_buffers()``, with two aliases: a tied
tensor may be named by any of its names (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``), and a
submodule wrapped by ``torch.compile`` may be named without its ``_orig_mod.`` segment.
"""

from __future__ import annotations

import difflib
import fnmatch
import itertools
import math
import re
from collections.abc import Container, Sequence
from dataclasses import dataclass
from types import EllipsisType
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

_BRACKETED = re.compile(r"\[[^\]]*\]")
#: Scalars the targets may expand to in all (``name[...]``, slices, globs): the monitor keeps K x K sums.
MAX_TARGETS = 4096
#: One item of a target's index: an element, a slice or ``...``.
Index = int | slice | EllipsisType
_GLOB_CHARS = frozenset("*?")
_COMPILED = "_orig_mod."


class LazyTargetError(ValueError):
    """A target names a parameter or buffer of a lazy module (``nn.LazyLinear``) that is not materialised yet."""


@dataclass(frozen=True)
class ResolvedTarget:
    """One scalar inside a module, or one element of every sample's input.

    Attributes:
        name: name of the parameter or buffer, as in ``module.named_parameters()`` (for a tied tensor, the
            first of its names there); for an input, the text of its path in the call, such as ``args[0]``.
        index: index of the element inside that tensor, non-negative, one entry per dimension (for an input,
            per dimension after the sample's).
        label: canonical text, ``name`` or ``name[i, j]`` with the name as given (a tied tensor keeps the name
            the user chose) less any ``_orig_mod.`` segment of ``torch.compile``; the key of every result. An
            input's is ``batch[0][:, 3]`` or ``args[0][:, 3]``: the sample dimension first.
        text: the target text the user gave (a glob keeps the glob's text).
        path: for an input, where its tensor is in the call's arguments: ``("args", 0)``, ``("kwargs", "y0")``
            and deeper keys; empty for a parameter or buffer.
    """

    name: str
    index: tuple[int, ...]
    label: str
    text: str
    path: tuple[str | int, ...] = ()

    @property
    def is_input(self) -> bool:
        return bool(self.path)

    @property
    def element(self) -> tuple[int | slice, ...]:
        """What to index the target's tensor with: its element, and every sample's for an input."""
        return (slice(None), *self.index) if self.path else self.index


def _label(name: str, index: tuple[Index, ...] | None) -> str:
    if index is None:
        return name
    return f"{name}[{', '.join(map(_text, index))}]"


def _text(item: Index) -> str:
    if item is Ellipsis:
        return "..."
    if isinstance(item, slice):
        parts = ["" if p is None else str(p) for p in (item.start, item.stop, item.step)]
        return ":".join(parts[:2] if item.step is None else parts)
    return str(item)


def _parse(text: str, api: str, names: Container[str] = ()) -> tuple[str, tuple[Index, ...] | None]:
    """``(name, index)`` of a target: a name (any text ``named_parameters()`` can give, spaces and brackets
    included when it is one of ``names``), optionally followed by one index in brackets."""
    stripped = text.strip()
    name, raw_index = stripped, None
    if stripped not in names and stripped.endswith("]") and "[" in stripped:
        start = stripped.rindex("[")
        name, raw_index = stripped[:start].rstrip(), stripped[start + 1 : -1]
    unbalanced = (name not in names and ("[" in name or "]" in name)) or "]" in (raw_index or "")
    if not name or unbalanced:
        raise ValueError(
            f"{api}: cannot parse target {text!r}; write a dotted name such as 'C' or 'blocks.*.alpha', "
            "optionally followed by one index in brackets such as 'net.0.weight[3, 1]'."
        )
    if raw_index is None:
        return name, None
    parts = [p.strip() for p in raw_index.split(",")]
    if parts and parts[-1] == "" and len(parts) > 1:  # a trailing comma, as in 'w[3,]'
        parts = parts[:-1]
    try:
        index = tuple(_item(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"{api}: the index of target {text!r} must be integers, slices (':', '1:3') or '...' separated by "
            f"commas, such as '{name}[0, 1]', '{name}[0, :]' or '{name}[...]'; got '[{raw_index}]'."
        ) from None
    if index.count(Ellipsis) > 1:
        raise ValueError(f"{api}: the index of target {text!r} holds '...' more than once.")
    return name, index


def _item(text: str) -> Index:
    """One item of an index: an integer, a slice ``start:stop:step`` (each part optional) or ``...``."""
    if text == "...":
        return Ellipsis
    if ":" not in text:
        return int(text)
    parts = [p.strip() for p in text.split(":")]
    if len(parts) > 3:
        raise ValueError(text)
    start, stop, step = (int(p) if p else None for p in [*parts, ""][:3])
    if step == 0:
        raise ValueError(text)
    return slice(start, stop, step)


def _named_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer by its first name, in module order (tied tensors once)."""
    tensors: dict[str, Tensor] = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    return tensors


def _display(name: str) -> str:
    """``name`` without the ``_orig_mod.`` segments that ``torch.compile`` inserts."""
    return name.replace(_COMPILED, "")


def _aliases(module: nn.Module, tensors: dict[str, Tensor]) -> dict[str, str]:
    """Every name a user may write -> the first name of that tensor: tied names (``remove_duplicate=False``)
    and names without ``_orig_mod.``."""
    first = {id(t): name for name, t in tensors.items()}
    every = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    aliases: dict[str, str] = {}
    for name, tensor in every:
        canonical = first.get(id(tensor), name)
        aliases.setdefault(name, canonical)
        aliases.setdefault(_display(name), canonical)
    return aliases


def _suggest(text: str, name: str, candidates: Sequence[str], index: tuple[Index, ...] | None) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    if not close:
        return "; use a name from module.named_parameters() or module.named_buffers()."
    shown = ", ".join(repr(_label(c, index) if index is not None else c) for c in close)
    return f"; did you mean {shown}?"


def _elements(text: str, name: str, tensor: Tensor, index: tuple[Index, ...] | None, api: str) -> list[tuple[int, ...]]:
    """Check one (name, index) pair against its tensor and return the elements it names, non-negative, in
    row-major order: one for an element, every element a slice or ``...`` selects."""
    if is_lazy(tensor):
        raise LazyTargetError(
            f"{api}: target {text!r} names {name!r}, an uninitialized parameter or buffer of a lazy module "
            "(such as nn.LazyLinear); run the module once on an input to materialise it before asking for its "
            "sensitivities."
        )
    if not tensor.is_floating_point():
        raise TypeError(
            f"{api}: target {text!r} names {name!r}, a tensor of dtype {tensor.dtype}; derivatives exist "
            "only for floating-point parameters or buffers. Convert it to a float dtype or choose another target."
        )
    shape = tuple(tensor.shape)
    if index is None:
        if tensor.numel() != 1:
            example = _label(name, tuple(0 for _ in shape))
            raise ValueError(
                f"{api}: target {text!r} names {name!r}, which holds {tensor.numel()} elements "
                f"(shape {shape}); pick one element with an index, such as {example!r}, or all with "
                f"{name + '[...]'!r}."
            )
        return [tuple(0 for _ in shape)]
    if Ellipsis in index:  # as many full slices as the dimensions the other items leave
        at = index.index(Ellipsis)
        index = (*index[:at], *(slice(None),) * (len(shape) - len(index) + 1), *index[at + 1 :])
    if len(index) != len(shape):
        if not shape:
            raise IndexError(
                f"{api}: target {text!r} indexes {name!r}, which is 0-dimensional (a single number); "
                f"write {name!r} without an index."
            )
        raise IndexError(
            f"{api}: target {text!r} gives {len(index)} index(es), but {name!r} has {len(shape)} "
            f"dimension(s) (shape {shape}); give one index per dimension, such as "
            f"{_label(name, tuple(0 for _ in shape))!r}."
        )
    for dim, (i, size) in enumerate(zip(index, shape, strict=True)):
        if isinstance(i, int) and not -size <= i < size:
            raise IndexError(
                f"{api}: index {i} of target {text!r} is out of range for dimension {dim} of {name!r} "
                f"(shape {shape}); valid indices are {-size}..{size - 1}."
            )
    pairs = zip(index, shape, strict=True)
    ranges = [range(size)[i] if isinstance(i, slice) else [cast(int, i) % size] for i, size in pairs]
    elements = [tuple(e) for e in itertools.product(*ranges)]  # row-major, as torch lays elements out
    if not elements:
        raise IndexError(f"{api}: target {text!r} selects no element of {name!r} (shape {shape}).")
    return elements


def _several(text: str) -> list[str] | None:
    """The targets a string holds when it is a comma-separated list (``"K, r"``: commas outside brackets)."""
    if "," not in _BRACKETED.sub("", text):
        return None
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def target_list(targets: str | Sequence[str], api: str) -> list[str]:
    """``targets`` as a non-empty list of strings (one string is a list of one), or a ``TypeError`` /
    ``ValueError`` prefixed with ``api``; a single string that is a comma-separated list (``"K, r"``, as YAML's
    ``targets: K, r`` gives) is refused with the list to write instead."""
    if isinstance(targets, str):
        parts = _several(targets)
        if parts is not None:
            raise ValueError(
                f"{api}: targets takes a list of targets, one per element; got the single string {targets!r}. "
                f"Write {parts!r} (in YAML: targets: [{', '.join(parts)}])."
            )
        targets = [targets]
    if not isinstance(targets, Sequence) or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"{api}: targets must be a string or a list of strings; got {targets!r}.")
    if len(targets) == 0:
        raise ValueError(f"{api}: targets is empty; name at least one parameter or buffer, such as ['C'].")
    return list(targets)


def resolve_targets(module: nn.Module, targets: str | Sequence[str], api: str) -> list[ResolvedTarget]:
    """Turn target strings into resolved targets, in the order given (globs in module order).

    Args:
        module: the module whose parameters and buffers are named.
        targets: one target string or a sequence of them.
        api: the calling API, used as the prefix of every error message.

    Returns:
        One :class:`ResolvedTarget` per scalar, with unique canonical labels.

    Raises:
        TypeError: ``targets`` is not a string or a sequence of strings, or a target is not floating point.
        ValueError: an empty list, an unknown name, a glob matching nothing, a tensor of several elements
            named without an index, or two targets naming the same element.
        IndexError: an index of the wrong rank or out of range.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 2))
        >>> [t.label for t in resolve_targets(net, ["0.weight[1, -1]", "0.bias[0]"], "api")]
        ['0.weight[1, 2]', '0.bias[0]']
    """
    targets = target_list(targets, api)
    tensors = _named_tensors(module)
    aliases = _aliases(module, tensors)
    shown = {_display(n): n for n in tensors}  # what globs match and suggestions offer, in module order
    owner = type(module).__name__
    resolved: list[ResolvedTarget] = []
    seen: dict[tuple[str, tuple[int, ...]], tuple[str, str]] = {}
    for text in targets:
        given, index = _parse(text, api, aliases)
        if given in aliases:
            matches = [(_display(given), aliases[given])]
        elif _GLOB_CHARS & set(given):
            matches = [(d, n) for d, n in shown.items() if any(fnmatch.fnmatchcase(x, given) for x in (d, n))]
            if not matches:
                raise ValueError(
                    f"{api}: target {text!r} matches no parameter or buffer of {owner}"
                    + _suggest(text, given, list(shown), index)
                )
        elif (parts := _several(text)) is not None:
            raise ValueError(
                f"{api}: {text!r} is not a parameter or buffer of {owner}; it reads as several targets in one "
                f"string: targets takes a list, {parts!r}."
            )
        else:
            raise ValueError(
                f"{api}: {text!r} is not a parameter or buffer of {owner}" + _suggest(text, given, list(shown), index)
            )
        for display, name in matches:
            for element in _elements(text, display, tensors[name], index, api):
                label = _label(display, element if index is not None and element else None)
                key = (name, element)
                if key in seen:
                    first, first_label = seen[key]
                    same = repr(label) if first_label == label else f"{first_label!r} and {label!r}, one tied tensor"
                    raise ValueError(f"{api}: targets {first!r} and {text!r} both name {same}; list each element once.")
                seen[key] = (text, label)
                resolved.append(ResolvedTarget(name=name, index=element, label=label, text=text))
            if len(resolved) > MAX_TARGETS:
                raise ValueError(
                    f"{api}: target {text!r} brings the targets to {len(resolved)} scalars, more than "
                    f"{MAX_TARGETS}: the monitor keeps K x K sums and pushes K tangents. Name fewer elements, such "
                    f"as a slice ('{display}[0, :]') or a few elements."
                )
    return resolved


def target_tensors(
    module: nn.Module, resolved: Sequence[ResolvedTarget], arguments: dict[str, Any] | None = None
) -> dict[str, Tensor]:
    """The tensors that ``resolved`` points into, by name, in first-use order: the module's, and the inputs' at
    their paths in ``arguments`` (``{"args": ..., "kwargs": ...}``)."""
    tensors = _named_tensors(module)
    out: dict[str, Tensor] = {}
    for target in resolved:
        if target.is_input:
            value: Any = arguments
            for key in target.path:
                value = value[key]
            out.setdefault(target.name, value)
            continue
        if target.name not in tensors:
            raise ValueError(
                f"target {target.label!r} was resolved against another module: {type(module).__name__} has no "
                f"parameter or buffer {target.name!r}."
            )
        out.setdefault(target.name, tensors[target.name])
    return out


def target_values(module: nn.Module, resolved: Sequence[ResolvedTarget]) -> Tensor:
    """The targets' values, ``[K]`` float64 on the host (one copy; a sharded ``DTensor`` is gathered first, a
    collective: every process must call this); NaN for an input, which has one value per sample."""
    tensors = target_tensors(module, [t for t in resolved if not t.is_input])
    full = {}
    for name, tensor in tensors.items():
        value = tensor.detach()
        full[name] = value.full_tensor() if hasattr(value, "full_tensor") else value
    device = next(iter(full.values())).device if full else torch.device("cpu")
    nan = torch.tensor(math.nan, dtype=torch.float64, device=device)
    values = [nan if t.is_input else full[t.name][t.index].to(torch.float64) for t in resolved]
    return torch.stack(values).cpu() if values else torch.zeros(0, dtype=torch.float64)


def resolve_all(
    module: nn.Module, targets: str | Sequence[str], api: str, arguments: dict[str, Any] | None
) -> list[ResolvedTarget]:
    """:func:`resolve_targets` for the module's tensors, and input targets (``args[0][:, 3]``, ``batch['y0']``)
    resolved in ``arguments`` (``{"args": ..., "kwargs": ...}`` or ``{"batch": ...}``), in the order given."""
    from lightning_sensitivity._inputs import is_input, resolve

    texts = target_list(targets, api)
    roots = set(arguments or ())
    names = _named_tensors(module)
    owned = {name.split(".")[0].split("[")[0] for name in names}

    def an_input(text: str) -> bool:
        return is_input(text, roots) and text.strip().split("[")[0].strip() not in owned

    ours = [text for text in texts if not an_input(text)]
    of_module = iter(resolve_targets(module, ours, api)) if ours else iter(())
    by_text: dict[str, list[ResolvedTarget]] = {}
    for target in of_module:
        by_text.setdefault(target.text, []).append(target)
    resolved: list[ResolvedTarget] = []
    seen: set[str] = set()
    for text in texts:
        found = resolve(text, arguments or {}, api) if an_input(text) else by_text.pop(text, [])
        for target in found:
            if target.label in seen:
                raise ValueError(f"{api}: target {text!r} names {target.label!r} again; list each element once.")
            seen.add(target.label)
        resolved.extend(found)
    if len(resolved) > MAX_TARGETS:
        raise ValueError(
            f"{api}: the targets make {len(resolved)} scalars, more than {MAX_TARGETS}: the monitor keeps K x K sums "
            "and pushes K tangents. Name fewer elements."
        )
    return resolved
