"""mkdocs hooks of the subriemann docs (registered in mkdocs.yml; not a page).

1. **Pages that may be missing** at build time are dropped instead of breaking
   the strict build: a nav entry whose Markdown file does not exist, and an API
   page (``docs/api/*.md``) whose ``::: subriemann.x`` module has no source file
   yet.  Other engineers' pages appear as soon as they exist.
2. **Links to the API** written ``[text][subriemann.x.y]`` in a page become plain
   links to the object's API page (``api/x.md#subriemann.x.y``), unambiguous even
   when a guide renders the same object; plain code when the module of
   ``subriemann.x.y`` does not exist (so the theory page can name functions of
   modules still being written).
3. **Links to pages that are left out** (``[text](flows.md)``) keep their text and
   lose the link.

The reST roles of the docstrings (``:math:``, ``.. math::``, ``:class:``) are
rewritten by the griffe extension ``docs/api/_griffe_rst.py``.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.subriemann")

_ROOT = Path(__file__).resolve().parents[2]
_DIRECTIVE = re.compile(r"^:::\s*(subriemann(?:\.\w+)*)", re.M)
_REF = re.compile(r"\[([^\]\n]+)\]\[(subriemann(?:\.\w+)+)\]")
_dropped: set[str] = set()
_API_PAGES: dict[str, str] = {}  # module -> its API page


def _module_exists(dotted: str) -> bool:
    """Whether the *module part* of ``dotted`` exists: ``subriemann.analysis.strata.f``."""
    parts = dotted.split(".")
    pkg = _ROOT / parts[0]
    i = 1
    while i < len(parts) and (pkg / "__init__.py").is_file():
        nxt = pkg / parts[i]
        if (nxt / "__init__.py").is_file():
            pkg = nxt
            i += 1
            continue
        if nxt.with_suffix(".py").is_file():
            return True
        # parts[i] is not a submodule: an object of package ``pkg`` (a class, possibly with
        # a method after it, or a function), or a module that does not exist yet
        return parts[i][:1].isupper() or i == len(parts) - 1
    return (pkg / "__init__.py").is_file() or pkg.with_suffix(".py").is_file()


def _page_ok(docs_dir: Path, rel: str) -> bool:
    path = docs_dir / rel
    if not path.is_file():
        return False
    if rel.startswith("api/"):
        for mod in _DIRECTIVE.findall(path.read_text(encoding="utf-8")):
            parts = mod.split(".")
            base = _ROOT.joinpath(*parts)
            if not (base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()):
                return False
    return True


def _filter_nav(items: list[Any], docs_dir: Path) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if isinstance(item, dict):
            (title, value), = item.items()
            if isinstance(value, list):
                sub = _filter_nav(value, docs_dir)
                if sub:
                    out.append({title: sub})
            elif isinstance(value, str) and value.endswith(".md") and "://" not in value:
                if _page_ok(docs_dir, value):
                    out.append(item)
                else:
                    _dropped.add(value)
            else:
                out.append(item)
        elif isinstance(item, str) and item.endswith(".md"):
            if _page_ok(docs_dir, item):
                out.append(item)
            else:
                _dropped.add(item)
        else:
            out.append(item)
    return out


def on_config(config: Any) -> Any:
    docs_dir = Path(config["docs_dir"])
    if config.get("nav"):
        config["nav"] = _filter_nav(config["nav"], docs_dir)
    for p in sorted((docs_dir / "api").glob("*.md")):
        rel = f"api/{p.name}"
        if not _page_ok(docs_dir, rel):
            _dropped.add(rel)
    _API_PAGES.clear()
    for p in sorted((docs_dir / "api").glob("*.md")):
        rel = f"api/{p.name}"
        if rel not in _dropped:
            for mod in _DIRECTIVE.findall(p.read_text(encoding="utf-8")):
                _API_PAGES[mod] = rel
    if _dropped:
        log.info("subriemann docs: leaving out (missing page or module): %s",
                 ", ".join(sorted(_dropped)))
    return config


def on_files(files: Any, config: Any) -> Any:
    for rel in list(_dropped):
        f = files.get_file_from_path(rel)
        if f is not None:
            files.remove(f)
    return files


def _api_page(identifier: str) -> str | None:
    """The API page rendering the longest module prefix of ``identifier``."""
    parts = identifier.split(".")
    for n in range(len(parts), 0, -1):
        page = _API_PAGES.get(".".join(parts[:n]))
        if page is not None:
            return page
    return None


_PAGE_LINK = re.compile(r"\[([^\]\n]+)\]\(([\w./-]+\.md)(#[\w.-]*)?\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    here = posixpath.dirname(page.file.src_uri)
    docs_dir = Path(config["docs_dir"])

    def page_link(m: re.Match[str]) -> str:
        target = posixpath.normpath(posixpath.join(here, m.group(2)))
        if target in _dropped or not (docs_dir / target).is_file():
            return m.group(1)  # a page that is not there (yet): keep the words, drop the link
        return m.group(0)

    markdown = _PAGE_LINK.sub(page_link, markdown)

    def repl(m: re.Match[str]) -> str:
        text, ident = m.group(1), m.group(2)
        target = _api_page(ident) if _module_exists(ident) else None
        if target is None:
            return f"`{text}`"
        # a plain link to the API reference: unambiguous even when a guide page
        # renders the same object too
        return f"[{text}]({posixpath.relpath(target, here or '.')}#{ident})"

    return _REF.sub(repl, markdown)
