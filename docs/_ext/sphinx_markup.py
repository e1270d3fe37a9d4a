"""Griffe extension: render the reST markup of the package's Google-style docstrings as Markdown.

The docstrings use Sphinx roles and directives inside Google sections (``:class:`~a.B```, ``:math:`x```,
``.. math::``, ``Example::``, simple tables). mkdocstrings renders Markdown, so before any docstring is parsed this
rewrites:

* ``:math:`x``` -> ``\\(x\\)`` and ``.. math::`` blocks -> ``$$ ... $$`` (``pymdownx.arithmatex``, generic mode);
* ``:class:``, ``:func:``, ``:meth:``, ``:mod:``, ``:attr:``, ``:data:``, ``:exc:`` -> an *optional* autorefs
  cross-reference to the object's canonical path (resolved like Sphinx: absolute, package-relative ``.mod.name``,
  then the current class and module, then a unique suffix match); a target that exists but is not rendered on any
  page stays plain code. A target that names this package (absolute or ``.relative``) but does not exist is logged
  as a warning, so ``mkdocs build --strict`` fails on it; names outside the package (torch, methods inherited from
  torch) are plain code;
* ``Example::`` -> ``Examples:`` (a Google section), a paragraph ending in ``::`` -> ``:`` (its indented block is
  a Markdown code block);
* simple reST tables (``====  ====``) -> Markdown tables.

Docs-only: nothing here changes the package.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(class|func|meth|mod|attr|data|exc|obj):`([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\. math::\s*(?P<rest>.*)$")
_TABLE_RULE = re.compile(r"^(?P<indent>\s*)(=+)(\s+=+)+\s*$")


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _math_blocks(lines: list[str]) -> list[str]:
    """``.. math:: expr`` (one line, continued on deeper-indented lines, or a following indented block) -> $$."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _MATH_DIRECTIVE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent = m.group("indent")
        body = [m.group("rest")] if m.group("rest").strip() else []
        i += 1
        # the body: following lines indented deeper than the directive (blank lines inside it are dropped)
        while i < len(lines):
            line = lines[i]
            if line.strip() == "":
                following = lines[i + 1] if i + 1 < len(lines) else ""
                if body and (not following.strip() or _indent_of(following) <= len(indent)):
                    break  # a blank line that ends the block
                i += 1
                continue
            if _indent_of(line) <= len(indent):
                break
            body.append(line.strip())
            i += 1
        if out and out[-1].strip():
            out.append("")
        out.extend([f"{indent}$$", *(f"{indent}{b}" for b in body), f"{indent}$$", ""])
    return out


def _tables(lines: list[str]) -> list[str]:
    """Simple reST tables (rules of ``=``) -> Markdown tables (an empty header row when the table has none)."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _TABLE_RULE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        rule = lines[i]
        indent = m.group("indent")
        starts = [s.start() for s in re.finditer(r"=+", rule)]
        rows: list[list[str]] = []
        rules_seen = 1
        header_rows = 0
        i += 1
        while i < len(lines):
            line = lines[i]
            if _TABLE_RULE.match(line):
                rules_seen += 1
                i += 1
                if i < len(lines) and lines[i].strip() and rules_seen == 2:
                    header_rows = len(rows)  # a second rule followed by more rows closes the header
                    continue
                break
            cells = []
            for j, start in enumerate(starts):
                stop = starts[j + 1] if j + 1 < len(starts) else len(line)
                cells.append(line[start:stop].strip())
            rows.append(cells)
            i += 1
        ncol = len(starts)
        header = rows[:header_rows] if header_rows else [[""] * ncol]
        body = rows[header_rows:] if header_rows else rows
        md = [f"{indent}| " + " | ".join(header[0]) + " |", f"{indent}|" + "---|" * ncol]
        md += [f"{indent}| " + " | ".join(r) + " |" for r in body]
        if out and out[-1].strip():
            out.append("")
        out.extend([*md, ""])
    return out


def _literal_markers(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        stripped = line.strip()
        if stripped in ("Example::", "Examples::"):
            line = line.replace(stripped, "Examples:")
        elif stripped.endswith("::") and not stripped.startswith(".."):
            line = line.rstrip()[:-1]
        out.append(line)
    return out


class SphinxMarkup(griffe.Extension):
    """Rewrite every docstring of the loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._pkg = pkg
        self._index: dict[str, list[str]] = {}
        self._collect(pkg)
        self._rewrite(pkg)

    # -- index of every object path, by its last component ------------------------------------------------------
    def _collect(self, obj: griffe.Object) -> None:
        self._index.setdefault(obj.name, []).append(obj.path)
        for member in obj.members.values():
            if member.is_alias:
                continue
            self._collect(member)  # type: ignore[arg-type]

    def _get(self, path: str) -> griffe.Object | griffe.Alias | None:
        parts = path.split(".")
        if parts[0] != self._pkg.name:
            return None
        obj: Any = self._pkg
        try:
            for part in parts[1:]:
                obj = obj.members[part]
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
        return obj

    def _canonical(self, path: str) -> str | None:
        obj = self._get(path)
        if obj is None:
            return None
        try:
            return obj.final_target.path if obj.is_alias else obj.path  # type: ignore[union-attr]
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None

    def _resolve(self, target: str, obj: griffe.Object) -> str | None:
        module = obj if obj.is_module else obj.module
        candidates: list[str] = []
        if target.startswith("."):
            package = module.path if module.is_package or module.is_init_module else module.parent.path  # type: ignore[union-attr]
            candidates.append(package + target)
        else:
            candidates.append(target)
            scope: Any = obj
            while scope is not None:  # the object itself, its class, its module, the package
                candidates.append(f"{scope.path}.{target}")
                scope = scope.parent
        for c in candidates:
            found = self._canonical(c)
            if found is not None:
                return found
            # a name a module exports lazily (``__all__`` + ``__getattr__``): the package's unique object of that name
            head, _, name = c.rpartition(".")
            exporter = self._get(head)
            if exporter is not None and exporter.is_module and name in [str(e) for e in exporter.exports or ()]:
                defined = [p for p in self._index.get(name, []) if self._canonical(p) == p]
                if len(defined) == 1:
                    return defined[0]
        last = target.lstrip(".").split(".")
        matches = [p for p in self._index.get(last[-1], []) if p.endswith("." + target.lstrip("."))]
        if len(matches) == 1:
            return self._canonical(matches[0])
        return None

    # -- rewriting -----------------------------------------------------------------------------------------------
    def _rewrite(self, obj: griffe.Object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = self._convert(obj.docstring.value, obj)
        for member in obj.members.values():
            if not member.is_alias:
                self._rewrite(member)  # type: ignore[arg-type]

    def _convert(self, text: str, obj: griffe.Object) -> str:
        lines = text.split("\n")
        lines = _math_blocks(lines)
        lines = _tables(lines)
        lines = _literal_markers(lines)
        text = "\n".join(lines)
        text = _MATH_ROLE.sub(lambda m: "\\(" + m.group(1) + "\\)", text)

        def role(m: re.Match[str]) -> str:
            raw = m.group(2).strip()
            short = raw.startswith("~")
            target = raw.lstrip("~")
            title = target.split(".")[-1] if short else target.lstrip(".")
            path = self._resolve(target, obj)
            if path is None and (target.startswith(".") or target.startswith(self._pkg.name + ".")):
                # the package's own name, yet no such object: a broken reference (fails --strict)
                where = f"{obj.relative_filepath}:{obj.docstring.lineno if obj.docstring else '?'}"
                griffe.logger.warning(f"{where}: cross-reference target not found: {m.group(0)} (in {obj.path})")
            if path is None:  # outside the package (torch, an inherited torch method): plain code
                return f"`{title}`"
            return f'<autoref identifier="{html.escape(path)}" optional>`{title}`</autoref>'

        return _ROLE.sub(role, text)
