"""The building blocks of a self-contained HTML page: escaped text, tables, PNGs embedded as ``data:`` URIs and
one small inline style sheet. Nothing is fetched: the page opens offline, from a file or an e-mail."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #345;padding-bottom:.2em}h2{font-size:1.3em;margin-top:1.8em;color:#234}
h3{font-size:1.05em;color:#345}table{border-collapse:collapse;margin:.6em 0 1em;font-size:.9em}
th,td{border:1px solid #ccd;padding:.25em .6em;text-align:left;vertical-align:top}th{background:#eef2f7}
tr.baseline td{color:#555;background:#fafafa}tr.chance td{color:#777;font-style:italic}
figure{display:inline-block;margin:.5em 1em .8em 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.85em;color:#555}
.note{color:#7a5b00;background:#fff8e0;padding:.3em .6em;border-left:3px solid #e0b000}
.wrong{color:#b00020;font-weight:600}nav a{margin-right:1em}code{background:#f3f3f3;padding:0 .2em}
"""


def esc(value: Any) -> str:
    """Any value as escaped HTML text (patient ids may hold ``<`` or ``&``)."""
    return html.escape(fmt(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def data_uri(path: Path) -> str:
    """A PNG file as a ``data:image/png;base64`` URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def figure(path: Path, caption: str) -> str:
    """An embedded PNG with its caption; a note instead when the file is missing or empty."""
    if not Path(path).is_file() or Path(path).stat().st_size == 0:
        return note(f"{caption}: no figure ({Path(path).name} missing)")
    alt = esc(caption)
    return f'<figure><img src="{data_uri(path)}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def paragraph(text: str) -> str:
    return f"<p>{esc(text)}</p>"


def table(header: Iterable[Any], rows: Iterable[Iterable[Any]], classes: Iterable[str] | None = None) -> str:
    """An HTML table of escaped cells; ``classes`` gives each row a CSS class (e.g. ``baseline``)."""
    titles = list(header)
    head = "".join(f"<th>{esc(h)}</th>" for h in titles)
    kinds = list(classes) if classes is not None else []
    body = []
    for i, row in enumerate(rows):
        kind = f' class="{esc(kinds[i])}"' if i < len(kinds) and kinds[i] else ""
        body.append(f"<tr{kind}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    thead = f"<thead><tr>{head}</tr></thead>" if any(str(t) for t in titles) else ""
    return f"<table>{thead}<tbody>{''.join(body)}</tbody></table>"


def section(anchor: str, title: str, parts: Iterable[str]) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{"".join(parts)}</section>'


def page(title: str, parts: Iterable[str], nav: Iterable[tuple[str, str]] = ()) -> str:
    """A whole page: ``parts`` (already HTML) under a title and a table of contents."""
    links = "".join(f'<a href="#{esc(anchor)}">{esc(label)}</a>' for anchor, label in nav)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{esc(title)}</h1>{f'<nav>{links}</nav>' if links else ''}{''.join(parts)}</body></html>\n"
    )
