"""MkDocs hook: pages take their text from README.md (the source of truth) instead of copying it.

A line of a page that reads, alone,

    {{ include("README.md", "Performance") }}

is replaced by the body of that file's section ``## Performance`` (up to the next heading of the same or a
higher level; ``subsections=False`` stops at the first heading of any level), its headings moved up so that
the highest of them is a ``##`` under the page's title. ``{{ include("CHANGELOG.md") }}`` takes a whole file
but its title. In the included text, links are rewritten for the site:

- ``#anchor`` to a section of the same file goes to the page that includes that section;
- a file under ``docs/`` (the README's screenshot) becomes relative to the page;
- any other path of the repository, folders included, goes to the repository on GitHub
  (``extra.repository_url``).

A heading that is not found, an anchor to a section no page includes, or a path that does not exist is logged
as a warning, which ``mkdocs build --strict`` turns into a failure, so a README edit that breaks a page is
caught by the docs build.
"""

from __future__ import annotations

import ast
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from markdown.extensions.toc import slugify

log = logging.getLogger("mkdocs.hooks.include_sections")

_DIRECTIVE = re.compile(r"^\{\{\s*(include\(.*\))\s*\}\}\s*$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"(!?\[(?:[^\[\]]|\[[^\]]*\])*\])\(([^()\s]+)\)")


@dataclass(frozen=True)
class _Include:
    path: str
    heading: str | None
    subsections: bool


@dataclass(frozen=True)
class _Section:
    level: int
    text: str
    start: int  # line index of the heading
    end: int  # line index one past the body


# Filled by on_files: (source file, heading slug) -> (page path in docs/, fragment or "")
_ANCHORS: dict[tuple[str, str], tuple[str, str]] = {}


def _parse(line: str) -> _Include | None:
    match = _DIRECTIVE.match(line)
    if not match:
        return None
    call = ast.parse(match.group(1), mode="eval").body
    assert isinstance(call, ast.Call)
    args = [ast.literal_eval(a) for a in call.args]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    return _Include(args[0], args[1] if len(args) > 1 else None, bool(kwargs.get("subsections", True)))


def _headings(lines: list[str]) -> list[tuple[int, int, str]]:
    """(line index, level, text) of every Markdown heading outside fenced code."""
    found, fenced = [], False
    for i, line in enumerate(lines):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else _HEADING.match(line)
        if match:
            found.append((i, len(match.group(1)), match.group(2)))
    return found


def _slug(heading: str) -> str:
    return slugify(heading.replace("`", ""), "-")


def _section(lines: list[str], include: _Include) -> tuple[_Section, list[tuple[int, int, str]]] | None:
    """The included section and the headings inside it."""
    heads = _headings(lines)
    if include.heading is None:  # the whole file but its title
        start = heads[0][0] if heads and heads[0][1] == 1 else -1
        return _Section(0, "", start, len(lines)), [h for h in heads if h[0] > start]
    for n, (i, level, text) in enumerate(heads):
        if text != include.heading:
            continue
        end = len(lines)
        for j, other_level, _ in heads[n + 1 :]:
            if other_level <= level or not include.subsections:
                end = j
                break
        return _Section(level, text, i, end), [h for h in heads if i < h[0] < end]
    return None


def on_files(files, config, **kwargs):
    """Find which page includes which section, so that anchors between sections can follow them."""
    _ANCHORS.clear()
    root = Path(config.config_file_path).parent
    for file in files.documentation_pages():
        for line in Path(file.abs_src_path).read_text(encoding="utf-8").splitlines():
            include = _parse(line)
            if include is None or not (root / include.path).is_file():
                continue
            lines = (root / include.path).read_text(encoding="utf-8").splitlines()
            found = _section(lines, include)
            if found is None:
                continue
            section, inner = found
            if section.text:
                _ANCHORS[(include.path, _slug(section.text))] = (file.src_uri, "")
            for _, _, text in inner:
                _ANCHORS.setdefault((include.path, _slug(text)), (file.src_uri, "#" + _slug(text)))
    return files


def _rewrite_links(text: str, source: str, page, config) -> str:
    root = Path(config.config_file_path).parent
    docs_dir = Path(config.docs_dir).resolve()
    repository = str(config.extra.get("repository_url", "")).rstrip("/")
    page_dir = os.path.dirname(page.file.src_uri)

    def link(match: re.Match[str]) -> str:
        label, target = match.groups()
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            return match.group(0)
        if target.startswith("#"):
            found = _ANCHORS.get((source, target[1:]))
            if found is None:
                log.warning(f"{page.file.src_uri}: {source} links to {target}, a section that no page includes")
                return match.group(0)
            path, fragment = found
            if path == page.file.src_uri:
                return f"{label}({fragment or '#'})"
            return f"{label}({os.path.relpath(path, page_dir or '.')}{fragment})"
        path_part, _, fragment = target.partition("#")
        resolved = (root / os.path.dirname(source) / path_part).resolve()
        if not resolved.exists():
            log.warning(f"{page.file.src_uri}: {source} links to {target!r}, which does not exist")
            return match.group(0)
        if resolved.is_file() and resolved.is_relative_to(docs_dir):
            relative = os.path.relpath(resolved.relative_to(docs_dir).as_posix(), page_dir or ".")
            return f"{label}({relative}{'#' + fragment if fragment else ''})"
        if not repository:
            log.warning(f"{page.file.src_uri}: a link to {target!r} needs extra.repository_url in mkdocs.yml")
            return match.group(0)
        kind = "tree" if resolved.is_dir() else "blob"
        url = f"{repository}/{kind}/main/{resolved.relative_to(root.resolve()).as_posix()}"
        return f"{label}({url}{'#' + fragment if fragment else ''})"

    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        out.append(line if fenced else _LINK.sub(link, line))
    return "\n".join(out)


def on_page_markdown(markdown, page, config, files, **kwargs):
    root = Path(config.config_file_path).parent
    out = []
    for line in markdown.splitlines():
        include = _parse(line)
        if include is None:
            out.append(line)
            continue
        where = f"{page.file.src_uri}: {line.strip()}"
        if not (root / include.path).is_file():
            log.warning(f"{where}: no file {include.path}")
            continue
        lines = (root / include.path).read_text(encoding="utf-8").splitlines()
        found = _section(lines, include)
        if found is None:
            log.warning(f"{where}: {include.path} has no heading {include.heading!r}")
            continue
        section, inner = found
        body = lines[section.start + 1 : section.end]
        # Under the page's title (#), the included headings start at ##: the README's #### become ##.
        shift = min((level for _, level, _ in inner), default=2) - 2
        for i, level, _ in inner:
            k = i - section.start - 1
            body[k] = "#" * max(level - shift, 2) + body[k].lstrip("#")
        out.append(_rewrite_links("\n".join(body).strip("\n"), include.path, page, config))
    return "\n".join(out) + "\n"
