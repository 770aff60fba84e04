"""Griffe extension (mkdocstrings ``extensions:``): two Sphinx conventions of the package's docstrings, on the site.

- A ``#:`` comment on the lines just above an attribute is its docstring, as Sphinx's autodoc reads it
  (``DEFAULT_PLANS``, ``Timer``). Griffe reads only a string literal after the assignment.
- Cross-reference roles in docstrings become links.

The package's docstrings refer to other objects the Sphinx way, ``:class:`~lightning_sensitivity.X```, which
``help()`` and IDEs show as they are. On the site each becomes an autorefs link, ``[`X`][lightning_sensitivity.X]``;
a name that does not start with the package's is taken in the docstring's module (``:meth:`` / ``:attr:``
in its class). A link to an
object that no page documents is a warning of mkdocs-autorefs, so ``mkdocs build --strict`` fails on it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|mod|exc|data|obj):`(~?)([\w.]+)`")


def _scope(obj: griffe.Object, role: str) -> str:
    if role in ("meth", "attr"):
        if obj.is_class:
            return obj.path
        if obj.parent is not None and obj.parent.is_class:
            return obj.parent.path
    return obj.module.path


def comment_docstring(obj: griffe.Object) -> griffe.Docstring | None:
    """The ``#:`` comment lines just above an attribute without a docstring, as its docstring."""
    if not obj.is_attribute or obj.docstring is not None or obj.lineno is None or obj.filepath is None:
        return None
    try:
        lines = obj.lines_collection[obj.filepath]  # type: ignore[index]
    except KeyError:
        return None
    found: list[str] = []
    for line in reversed(lines[: obj.lineno - 1]):
        stripped = line.strip()
        if not stripped.startswith("#:"):
            break
        found.insert(0, stripped[2:].removeprefix(" "))
    if not found:
        return None
    return griffe.Docstring("\n".join(found), lineno=obj.lineno - len(found), parent=obj)


class SphinxRoles(griffe.Extension):
    """Take ``#:`` comments as attributes' docstrings, and rewrite ``:role:`target``` in every docstring as an
    autorefs cross-reference."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            obj.docstring = comment_docstring(obj)
        if obj.docstring is None or ":`" not in obj.docstring.value:
            return

        def link(match: re.Match[str]) -> str:
            role, short, target = match.groups()
            absolute = target.split(".", 1)[0] == obj.package.name
            identifier = target if absolute else f"{_scope(obj, role)}.{target}"
            shown = target.rsplit(".", 1)[-1] if short else target
            return f"[`{shown}`][{identifier}]"

        obj.docstring.value = _ROLE.sub(link, obj.docstring.value)
