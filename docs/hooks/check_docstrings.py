"""MkDocs hook: fail the strict build when a public object has no docstring.

mkdocstrings leaves an object without a docstring out of the page without a word. Before each build this hook
reads the package the way mkdocstrings does (griffe, Google style) and logs a warning, which
``mkdocs build --strict`` turns into a failure, for

- a name in ``lightning_sensitivity.__all__``, or an object of a ``::: path`` line of a page, without a
  docstring (a ``#:`` comment above an attribute counts, as on the site: ``sphinx_roles.py``);
- a public method, property or attribute of such a class without a docstring, unless the class docstring
  documents it (``Args:`` / ``Attributes:``) or it overrides a method of a base class from another package
  (a Lightning ``Callback`` hook, documented by Lightning);
- a parameter of such a function or constructor that its ``Args:`` section does not describe (exceptions
  are exempt: the package raises them, users do not build them).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import sys
from pathlib import Path

import griffe

log = logging.getLogger("mkdocs.hooks.check_docstrings")

PACKAGE = "lightning_sensitivity"
_DIRECTIVE = re.compile(r"^:::\s+([\w.]+)\s*$", re.M)


def _documented_names(obj: griffe.Object) -> set[str]:
    """Names that the ``Args:`` / ``Attributes:`` sections of a docstring describe."""
    names: set[str] = set()
    for section in obj.docstring.parsed if obj.docstring else []:
        if section.kind in (griffe.DocstringSectionKind.parameters, griffe.DocstringSectionKind.attributes):
            names.update(item.name for item in section.value)
    return names


def _public(name: str) -> bool:
    return not name.startswith("_")


def _overrides_foreign(runtime_cls: type, name: str) -> bool:
    """Whether ``name`` is defined by a base class from another package."""
    return any(
        name in vars(base) and not base.__module__.startswith(PACKAGE) for base in inspect.getmro(runtime_cls)[1:]
    )


def _check_parameters(obj: griffe.Function, documented_in: griffe.Object, problems: list[str]) -> None:
    described = _documented_names(documented_in)
    for parameter in obj.parameters:
        if parameter.name in ("self", "cls") or parameter.kind.value in ("variadic positional", "variadic keyword"):
            continue
        if parameter.name not in described:
            problems.append(f"{documented_in.path}: parameter {parameter.name!r} is not described under Args:")


def _check_class(obj: griffe.Class, runtime: type, problems: list[str]) -> None:
    described = _documented_names(obj)
    init = obj.members.get("__init__")
    if isinstance(init, griffe.Function):
        described |= _documented_names(init)
        if not issubclass(runtime, BaseException):
            _check_parameters(init, obj if not init.docstring else init, problems)
    for name, member in obj.members.items():
        if not _public(name) or member.is_alias or member.docstring or name in described:
            continue
        if _overrides_foreign(runtime, name):
            continue
        kind = "property" if "property" in member.labels else member.kind.value
        problems.append(f"{member.path}: public {kind} without a docstring")


def on_pre_build(config, **kwargs):
    root = Path(config.config_file_path).parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    package = importlib.import_module(PACKAGE)
    # with the site's griffe extension, so that a ``#:`` comment counts as a docstring here as it does on the site
    extensions = griffe.load_extensions(str(Path(__file__).with_name("sphinx_roles.py")))
    loaded = griffe.load(PACKAGE, search_paths=[str(root)], docstring_parser="google", extensions=extensions)

    paths = [f"{PACKAGE}.{name}" for name in package.__all__]
    for page in sorted(Path(config.docs_dir).rglob("*.md")):
        paths += [p for p in _DIRECTIVE.findall(page.read_text(encoding="utf-8")) if p not in paths]

    problems: list[str] = []
    for path in paths:
        if not path.startswith(PACKAGE + "."):
            continue
        try:
            obj = loaded[path.removeprefix(PACKAGE + ".")]
            obj = obj.final_target if obj.is_alias else obj
        except (KeyError, griffe.AliasResolutionError):
            problems.append(f"{path}: not found")
            continue
        if not obj.docstring or not obj.docstring.value.strip():
            problems.append(f"{path}: no docstring")
            continue
        runtime = importlib.import_module(obj.module.path)
        for part in obj.path.removeprefix(obj.module.path + ".").split("."):
            runtime = getattr(runtime, part)
        if isinstance(obj, griffe.Class):
            _check_class(obj, runtime, problems)
        elif isinstance(obj, griffe.Function):
            _check_parameters(obj, obj, problems)
    for problem in problems:
        log.warning(f"missing documentation: {problem}")
