"""The report's HTML: blocks (a figure, a table, a note, a failure), a section, the page.

Everything is inline: figures are PNGs in ``data:`` URIs, the style sheet is one ``<style>``
element, there is no script and no reference to anything outside the file, so the page opens the
same from a disk, an e-mail attachment or a web server.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field

__all__ = ["Figure", "Table", "Text", "Missing", "Failed", "Details", "Rec", "render_section", "render_page",
           "png_of", "DPI"]

DPI = 90  # figures are a few hundred pixels per panel: readable, and the page stays around a megabyte


def png_of(fig) -> bytes:
    """The figure as PNG bytes (the Agg renderer, whatever backend pyplot uses)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


@dataclass
class Figure:
    title: str
    png: bytes
    caption: str = ""

    def html(self) -> str:
        src = "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")
        cap = f"<figcaption><b>{_e(self.title)}</b>{(' ' + _e(self.caption)) if self.caption else ''}</figcaption>"
        return f'<figure><img src="{src}" alt="{_e(self.title)}">{cap}</figure>'


@dataclass
class Table:
    title: str
    header: list | None     # None: a two-column table of names and values, no header row
    rows: list
    caption: str = ""

    def html(self) -> str:
        head = "".join(f"<th>{_e(h)}</th>" for h in self.header or [])
        body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in self.rows)
        cap = f"<caption><b>{_e(self.title)}</b>{(' ' + _e(self.caption)) if self.caption else ''}</caption>"
        thead = f"<thead><tr>{head}</tr></thead>" if head else ""
        return f'<div class="table"><table>{cap}{thead}<tbody>{body}</tbody></table></div>'


@dataclass
class Text:
    text: str
    cls: str = ""

    def html(self) -> str:
        cls = f' class="{_e(self.cls)}"' if self.cls else ""
        return f"<p{cls}>{_e(self.text)}</p>"


@dataclass
class Missing:
    """A figure left out: which metric it needs and which hook or command writes it (one line)."""
    title: str
    why: str

    def html(self) -> str:
        return f'<p class="missing"><b>{_e(self.title)}</b>: left out -- {_e(self.why)}</p>'


@dataclass
class Failed:
    """A figure whose drawing raised: what failed; the rest of the report is unaffected."""
    title: str
    error: str

    def html(self) -> str:
        return f'<p class="failed"><b>{_e(self.title)}</b>: could not be drawn -- {_e(self.error)}</p>'


@dataclass
class Details:
    """A folded block: a summary line and preformatted text (a config, a patch) or other blocks."""
    summary: str
    text: str = ""
    blocks: list = field(default_factory=list)

    def html(self) -> str:
        inner = (f"<pre>{_e(self.text)}</pre>" if self.text else "") + "".join(b.html() for b in self.blocks)
        return f"<details><summary>{_e(self.summary)}</summary>{inner}</details>"


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _cell(c) -> str:
    if isinstance(c, float):
        return "n/a" if c != c else _e(f"{c:.4g}")
    if isinstance(c, (dict, list)):
        return f"<code>{_e(json.dumps(c))}</code>"
    return _e("" if c is None else c)


def render_section(key: str, title: str, intro: str, blocks: list) -> str:
    body = (f"<p class=\"intro\">{_e(intro)}</p>" if intro else "") + "\n".join(b.html() for b in blocks)
    return f'<section id="{_e(key)}"><h2>{_e(title)}</h2>\n{body}\n</section>'


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:14px 28px}header h1{margin:0;font-size:1.4em}
header p{margin:4px 0 0;color:#cfd8dc;font-size:.9em}
nav{padding:8px 28px;background:#eceff1;font-size:.9em;position:sticky;top:0;z-index:1}
nav a{margin-right:14px;color:#37474f;text-decoration:none}nav a:hover{text-decoration:underline}
main{padding:4px 28px 40px;max-width:1500px}
section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;margin:16px 0;padding:8px 18px 14px}
h2{font-size:1.15em;border-bottom:1px solid #eee;padding-bottom:4px}
figure{display:inline-block;margin:8px 12px 8px 0;vertical-align:top;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#444;max-width:900px}
.table{overflow-x:auto;margin:8px 0}table{border-collapse:collapse;font-size:.85em}
caption{text-align:left;padding:4px 0;font-size:.95em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f5f5f5}
td code{font-size:.9em;white-space:pre-wrap}
p.intro{color:#555;font-size:.9em}p.missing{color:#8d6e63;font-size:.9em;margin:4px 0}
p.failed{color:#b71c1c;font-size:.9em;margin:4px 0}
pre{background:#f5f5f5;padding:8px;font-size:.8em;overflow-x:auto}
details{margin:6px 0}summary{cursor:pointer;color:#37474f}
.rec{border-left:3px solid #1565c0;padding:2px 12px;margin:10px 0}.rec h3{margin:6px 0;font-size:1em}
"""


def render_page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole page: ``sections`` is ``[(key, title, html)]`` in order; the nav links them."""
    nav = "".join(f'<a href="#{_e(k)}">{_e(t)}</a>' for k, t, _ in sections)
    body = "\n".join(h for _, _, h in sections)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head>\n<body>"
            f"<header><h1>{_e(title)}</h1><p>{_e(subtitle)}</p></header>\n<nav>{nav}</nav>\n"
            f"<main>\n{body}\n</main></body></html>\n")


@dataclass
class Rec:
    """One recommendation (``Recommendation.to_dict()``): value, range, summary, evidence, assumptions,
    what would change it, the config patch and how to check it."""
    rec: dict

    def html(self) -> str:
        r = self.rec
        level = r.get("level")
        rng = (f"estimate {_cell(r.get('estimate'))} ({'' if level is None else f'{level:.0%} '}range "
               f"{_cell(r.get('low'))} - {_cell(r.get('high'))})")
        out = [f'<div class="rec" id="rec-{_e(r.get("name"))}"><h3>{_e(r.get("name"))}: {_cell(r.get("value"))} '
               f'{_e(r.get("unit", ""))}</h3>', f"<p>{_e(r.get('summary', ''))}</p><p>{_e(rng)}</p>"]
        if r.get("evidence"):
            out.append(Table("evidence", ["signal", "value"], [[k, v] for k, v in r["evidence"].items()]).html())
        for title, key in (("assumes", "assumptions"), ("would change if", "would_change")):
            if r.get(key):
                out.append(f"<p>{title}:</p><ul>" + "".join(f"<li>{_e(x)}</li>" for x in r[key]) + "</ul>")
        if r.get("patch"):
            out.append(Details("config patch", json.dumps(r["patch"], indent=2)).html())
        if r.get("check"):
            out.append(f"<p>check it: <code>{_e(r['check'])}</code></p>")
        return "".join(out) + "</div>"

