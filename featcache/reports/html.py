"""HTML building blocks of the reports: escaping, number formats, tables, figures with embedded
PNGs, sections and the page itself (inline CSS, no script, nothing fetched)."""

from __future__ import annotations

import base64
import html
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .. import __version__
from ..errors import ConfigError
from ..metrics.scores import format_value

logger = logging.getLogger(__name__)


@dataclass
class Page:
    """What a report page says: its kind (e.g. "featcache run"), title, one-line lede and body HTML."""

    kind: str
    title: str
    lede: str
    body: str


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def shots_label(s: Any) -> str:
    return "all" if not s else str(s)


def fmt(v: Any, digits: int = 4) -> str:
    return format_value(v, digits, missing="–")


def fmt_value(v: Any) -> str:
    """A swept parameter value: 0.001, 1, 1e+04."""
    if isinstance(v, float):
        return f"{v:g}"
    return "–" if v is None else str(v)


def seconds(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "–"
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


def table(headers: Sequence[tuple[str, str]], rows: Iterable[Sequence[Any]], *, table_id: str | None = None,
           row_classes: Sequence[str] | None = None, scroll: bool = False) -> str:
    """``headers`` are (text, kind) with kind "num", "text" or "wrap"; cells are pre-escaped HTML."""
    head = "".join(f'<th class="{k}">{esc(h)}</th>' for h, k in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(f'<td class="{k}">{c}</td>' for (_, k), c in zip(headers, row))
        body.append(f"<tr{cls}>{cells}</tr>")
    tid = f' id="{esc(table_id)}"' if table_id else ""
    table = f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="{"scroll" if scroll else "wide"}">{table}</div>'


def facts(items: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items if v is not None and v != "")
    return f'<dl class="facts">{rows}</dl>'


def img(path: Path, alt: str, caption: str | None = None) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}">{cap}</figure>'


def plot(make: Callable[[Path], Path], tmp: Path, name: str, alt: str, caption: str | None = None) -> str:
    """A plot embedded, or a note saying why it could not be drawn (the page still renders)."""
    try:
        return img(make(tmp / name), alt, caption)
    except (ConfigError, ValueError) as e:  # one plot that cannot be drawn must not cost the whole page
        logger.warning("Plot %s skipped: %s", name, e)
        return note(f"Plot not drawn: {e}")


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def section(title: str, *parts: str, sid: str | None = None) -> str:
    sid_attr = f' id="{esc(sid)}"' if sid else ""
    return f"<section{sid_attr}><h2>{esc(title)}</h2>{''.join(parts)}</section>"


def bar_cell(v: Any) -> str:
    """A score in [0, 1] with a proportional bar behind it (pure CSS)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return esc(fmt(v, 3))
    pct = max(0.0, min(100.0, 100.0 * v))
    return (f'<span class="bar" style="background:linear-gradient(90deg,#c7dcf5 {pct:.1f}%,'
            f'transparent {pct:.1f}%)">{esc(f"{v:.3f}")}</span>')


CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: #1f2933;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 36px 48px; }
header { border-bottom: 3px solid #2563eb; padding-bottom: 14px; margin-bottom: 8px; }
.kind { text-transform: uppercase; letter-spacing: .08em; font-size: 12px; font-weight: 700; color: #2563eb; margin: 0; }
h1 { font-size: 27px; line-height: 1.25; margin: 2px 0 6px; overflow-wrap: anywhere; }
.lede { margin: 0 0 6px; color: #3e4c59; max-width: 900px; }
.meta { margin: 0; color: #7b8794; font-size: 13px; overflow-wrap: anywhere; }
h2 { font-size: 19px; margin: 30px 0 10px; padding-bottom: 4px; border-bottom: 1px solid #e4e7eb; }
section > p { max-width: 900px; }
.wide { overflow-x: auto; max-width: 100%; }
.scroll { overflow: auto; max-height: 520px; max-width: 100%; border: 1px solid #e4e7eb; border-radius: 4px; }
table { border-collapse: collapse; font-size: 14px; margin: 4px 0 8px; }
th, td { padding: 5px 12px; border-bottom: 1px solid #e4e7eb; text-align: left; vertical-align: top; }
thead th { background: #f5f7fa; font-weight: 600; position: sticky; top: 0; border-bottom: 2px solid #cbd2d9; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.wrap { overflow-wrap: anywhere; max-width: 320px; }
td.text { white-space: nowrap; }
tr.top td { background: #fff8e1; font-weight: 600; }
tr.tied td { background: #eef4ff; }
.ci { color: #7b8794; font-size: 12px; font-weight: 400; }
tr.freeze td { background: #fdecea; }
tr.tune td { background: #fff4e5; }
.bar { display: inline-block; min-width: 64px; padding: 0 6px; border-radius: 3px; }
.tag { display: inline-block; margin-left: 6px; padding: 0 7px; border-radius: 9px; font-size: 11px;
  font-weight: 600; background: #e0e7ff; color: #3730a3; white-space: nowrap; }
.tag.freeze { background: #fbd5d0; color: #922b21; }
.tag.tune { background: #ffe3bf; color: #8a4b00; }
.tag.best { background: #fff0b3; color: #6b5000; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 3px 18px; margin: 6px 0; font-size: 14px; }
dl.facts dt { color: #616e7c; }
dl.facts dd { margin: 0; overflow-wrap: anywhere; font-variant-numeric: tabular-nums; }
figure { margin: 10px 0 14px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #e4e7eb; border-radius: 4px; }
figcaption { color: #616e7c; font-size: 13px; margin-top: 4px; }
.callout { border-left: 5px solid #2563eb; background: #eff6ff; padding: 12px 18px; border-radius: 4px; margin: 8px 0 12px; }
.callout p { margin: 4px 0; }
.callout .big { font-size: 17px; font-weight: 600; }
.note { color: #7b8794; font-style: italic; }
details summary { cursor: pointer; color: #2563eb; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px;
  background: #f5f7fa; padding: 0 4px; border-radius: 3px; overflow-wrap: anywhere; }
footer { margin-top: 40px; padding-top: 8px; border-top: 1px solid #e4e7eb; color: #9aa5b1; font-size: 12px; }
"""


def render(page: Page, src: Path) -> str:
    """The whole HTML document of ``page``, made from the files in ``src``."""
    kind, title, lede, body = page.kind, page.title, page.lede, page.body
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="featcache {esc(__version__)}">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f'<header><p class="kind">{esc(kind)}</p><h1>{esc(title)}</h1><p class="lede">{esc(lede)}</p>'
        f'<p class="meta">Generated {esc(now)} from <code>{esc(src)}</code></p></header>'
        f"{body}"
        f"<footer>featcache {esc(__version__)} · self-contained report: no scripts, no external resources.</footer>"
        "</main></body></html>\n"
    )
