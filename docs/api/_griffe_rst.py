"""Griffe extension of the subriemann docs: reST roles of the docstrings to Markdown.

The library's numpy docstrings use a few reStructuredText constructs (they also
render in Sphinx and in ``help()``).  Before mkdocstrings renders a docstring,
this extension rewrites:

* ``:math:`x``` → ``$x$`` (one line), rendered by pymdownx.arithmatex + MathJax;
* a ``.. math::`` directive and its indented lines → a ``$$ ... $$`` block;
* ``:class:`~subriemann.x.Y``` (``:func:``, ``:meth:``, ``:mod:``, ...) → a link to
  the API page of ``subriemann.x.Y`` when it exists (an optional autoref), else code;
  the ``~`` keeps the last name only.

Registered in mkdocs.yml (``extensions:`` of the python handler); not a page.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_INLINE = re.compile(r":math:`(.+?)`", re.S)
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc|const):`(~?)([\w.]+)(\(\))?`")


def _inline(m: re.Match[str]) -> str:
    return "$" + " ".join(m.group(1).split()) + "$"


def _role(m: re.Match[str]) -> str:
    name = m.group(2)
    shown = name.rsplit(".", 1)[-1] if m.group(1) else name
    shown += m.group(3) or ""
    if name.startswith("subriemann"):
        return f'<autoref identifier="{name}" optional><code>{shown}</code></autoref>'
    return f"`{shown}`"


def _display(text: str) -> str:
    """``.. math:: a`` + indented continuation lines → ``$$ a ... $$``."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(\s*)\.\. math::\s*(.*)$", line)
        if not m:
            out.append(line)
            i += 1
            continue
        indent, first = m.group(1), m.group(2)
        body = [first] if first.strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or
                                  len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            if lines[i].strip():
                body.append(lines[i].strip())
            elif body and i + 1 < len(lines) and not lines[i + 1].startswith(indent + " "):
                break
            i += 1
        out.extend(["", f"{indent}$$", *[f"{indent}{b}" for b in body], f"{indent}$$", ""])
    return "\n".join(out)


def convert(text: str) -> str:
    """The Markdown form of a docstring written with reST math and object roles."""
    text = _display(text)
    text = _INLINE.sub(_inline, text)
    return _ROLE.sub(_role, text)


class RestructuredRoles(griffe.Extension):
    """Rewrite reST math and object roles in every docstring (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
