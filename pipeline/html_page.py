"""The pieces every HTML report page shares: one page skeleton with its CSS and a little
plain JS (filters, a table sort), a wall-clock chart in inline SVG, probability bars.

No network and no framework: a page opens from disk in any browser. Every text that goes
into a page passes through `esc` (html.escape, quotes included), and void elements are
written self-closed, so a page is also well-formed XML (the tests parse it strictly).
"""

from __future__ import annotations

import html
from collections.abc import Sequence

OPTION_LETTERS = "ABCDE"


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:12px;
color:#1d232a;background:#fff}
h1{font-size:22px}h2{font-size:18px;margin:4px 0}h3{font-size:15px;margin:4px 0}
table{border-collapse:collapse}td,th{border:1px solid #ccd;padding:3px 6px;text-align:left}
th{background:#eef1f6}
.note{color:#5a6270;font-size:12px}
.card{border:1px solid #ccd;border-radius:6px;padding:8px;margin:10px 0;background:#fafbfd}
.failed{border-color:#c0392b;background:#fdf1f0}
.reason{color:#a02518;font-weight:600}
.strip{display:flex;gap:6px;overflow-x:auto;padding-bottom:4px}
figure{margin:0;width:164px;flex:0 0 auto;font-size:11px}
figure img{width:160px;border:2px solid #ccd;display:block}
figure.changed img{border-color:#2e86de}
del{background:#ffd6d2;text-decoration:line-through}ins{background:#c9f2d0;text-decoration:none}
.bar{display:inline-block;height:10px;background:#2e86de;vertical-align:middle}
.opt{margin:1px 0}.chosen{font-weight:700}.correct::after{content:" \\2714 correct";color:#1e8449}
.wrong-mark{color:#c0392b;font-weight:700}
pre{white-space:pre-wrap;background:#f1f3f7;padding:6px;max-height:320px;overflow:auto}
nav a{margin-right:8px}
.filters label{margin-right:14px}
body.only-wrong .question:not(.wrong),body.only-wrong .video:not(.has-wrong){display:none}
body.only-failures .question:not(.failed),body.only-failures .video:not(.has-failure){display:none}
body.only-changed figure:not(.changed),body.only-changed tr.frame:not(.changed){display:none}
body.only-changed .video:not(.has-changed){display:none}
body.only-changed tr.item:not(.changed),body.only-failures tr.item:not(.failed){display:none}
"""

# Filters toggle a class on <body>; CSS above does the hiding. Sort: a table whose header
# cell has data-sort sorts its body rows by that column's data-value (numbers).
JS = """
document.querySelectorAll('input[data-filter]').forEach(function (box) {
  box.addEventListener('change', function () {
    document.body.classList.toggle(box.dataset.filter, box.checked);
  });
});
document.querySelectorAll('th[data-sort]').forEach(function (th) {
  th.style.cursor = 'pointer';
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0];
    var col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var down = th.dataset.dir !== 'down';
    th.dataset.dir = down ? 'down' : 'up';
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = parseFloat(a.cells[col].dataset.value), y = parseFloat(b.cells[col].dataset.value);
      if (isNaN(x)) { x = -Infinity; } if (isNaN(y)) { y = -Infinity; }
      return down ? y - x : x - y;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>"
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
            f"<script>{JS}</script>\n</body></html>\n")


def filters(boxes: Sequence[tuple[str, str]]) -> str:
    """Checkboxes (body class, label) that hide what does not match, on this page."""
    inner = "".join(f'<label><input type="checkbox" data-filter="{esc(cls)}"/> {esc(label)}'
                    f"</label>" for cls, label in boxes)
    return f'<div class="filters card">Show {inner}</div>'


def stage_chart(wall: dict[str, float], width: int = 560) -> str:
    """Horizontal bars of seconds per stage, scaled to the largest, as inline SVG."""
    items = [(k, float(v)) for k, v in wall.items() if isinstance(v, (int, float))]
    if not items:
        return "<p>no wall-clock recorded</p>"
    top = max(v for _, v in items) or 1.0
    row, label_w, bar_w = 22, 170, width - 170 - 80
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{row * len(items) + 4}" role="img" aria-label="wall-clock per stage">']
    for i, (name, seconds) in enumerate(items):
        y = i * row + 2
        w = max(1.0, bar_w * seconds / top)
        parts.append(
            f'<text x="0" y="{y + 14}" font-size="12">{esc(name)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="14" fill="#2e86de"/>'
            f'<text x="{label_w + w + 4:.1f}" y="{y + 14}" font-size="12">{seconds:.1f} s</text>')
    parts.append("</svg>")
    return "".join(parts)


def option_bars(options: Sequence[str], probs: Sequence[float] | None, chosen: int | None,
                correct: int | None) -> str:
    """One line per option: letter, text, its probability as a bar; chosen bold, the
    correct one ticked."""
    lines = []
    for i, option in enumerate(options):
        classes = ["opt"] + (["chosen"] if i == chosen else []) + \
            (["correct"] if i == correct else [])
        p = probs[i] if probs and i < len(probs) else None
        bar = (f'<span class="bar" style="width:{max(1, round(200 * p))}px"></span> {p:.2f} '
               if p is not None else "")
        lines.append(f'<div class="{" ".join(classes)}">{bar}{OPTION_LETTERS[i]}. '
                     f"{esc(option)}</div>")
    return "".join(lines)
