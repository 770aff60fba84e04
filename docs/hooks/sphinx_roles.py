"""Griffe extension (mkdocstrings ``extensions:``): Sphinx cross-reference roles in docstrings become links.

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


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`target``` in every docstring as an autorefs cross-reference."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None or ":`" not in obj.docstring.value:
            return

        def link(match: re.Match[str]) -> str:
            role, short, target = match.groups()
            absolute = target.split(".", 1)[0] == obj.package.name
            identifier = target if absolute else f"{_scope(obj, role)}.{target}"
            shown = target.rsplit(".", 1)[-1] if short else target
            return f"[`{shown}`][{identifier}]"

        obj.docstring.value = _ROLE.sub(link, obj.docstring.value)
