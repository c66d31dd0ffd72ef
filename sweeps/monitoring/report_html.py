"""The sweep report as one self-contained HTML file: ``SWEEP_DIR/report/report.html`` next to ``report.md``.

Contract: :func:`write_html` turns the report's Markdown into HTML (markdown-it, CommonMark with tables) and
replaces every image that names a file in the report folder with the file itself, inline as a base64 ``data:``
URI. The page has its style inline, no script, and names nothing outside itself: it opens the same with no network
and after being moved or mailed. An image whose file is missing stays a plain reference (its alt text shows).
"""
from __future__ import annotations

import base64
import html
import os
import re
from pathlib import Path

from brats_ugrip.atomic import atomic_write_text

REPORT_HTML = "report.html"
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 72rem;
       padding: 0 1rem; color: #1b1b1b; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.85rem; }
th, td { border: 1px solid #c8c8c8; padding: 0.25rem 0.5rem; text-align: left; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; height: auto; border: 1px solid #e0e0e0; margin: 0.5rem 0; }
code { background: #f4f4f4; padding: 0 0.2rem; border-radius: 3px; }
"""
_IMG = re.compile(r'<img src="([^"]+)"')
_TYPES = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def _inline(folder: Path, match: re.Match[str]) -> str:
    name = html.unescape(match.group(1))
    path = folder / name
    kind = _TYPES.get(path.suffix.lower())
    if "/" in name or ":" in name or kind is None or not path.is_file():
        return match.group(0)  # only the report's own figures are inlined; anything else is left as written
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:{kind};base64,{data}"'


def to_html(markdown: str, folder: str | os.PathLike[str], title: str = "Sweep report") -> str:
    """The page for ``markdown`` whose images are files of ``folder`` (see the module docstring)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)
    body = _IMG.sub(lambda m: _inline(Path(folder), m), body)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")


def write_html(markdown_path: str | os.PathLike[str], title: str = "Sweep report") -> Path:
    """Write ``report.html`` next to ``markdown_path`` from it and its figures; returns its path."""
    markdown_path = Path(markdown_path)
    page = to_html(markdown_path.read_text(), markdown_path.parent, title)
    return atomic_write_text(markdown_path.parent / REPORT_HTML, page)
