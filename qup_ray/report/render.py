"""One document, two renderings: `report.md` (images beside it) and a self-contained
`report.html` (images embedded as base64, so it opens anywhere with no network)."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 0.85em; }
th, td { border: 1px solid #bbb; padding: 3px 7px; text-align: right; }
th { background: #eef; } td:first-child, th:first-child { text-align: left; }
td.missing { color: #b00; } img { max-width: 100%; border: 1px solid #ddd; margin: 0.4em 0; }
figcaption { font-size: 0.85em; color: #555; margin-bottom: 1.4em; }
.scroll { overflow-x: auto; }
.verdict { background: #f6f6ee; border-left: 4px solid #998; padding: 0.4em 0.8em; }
"""


def format_cell(value: object) -> str:
    """Numbers to 4 significant digits, missing values as an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass
class Document:
    """Blocks in reading order: (kind, payload) with kind in h1, h2, h3, p, verdict, table, image."""

    blocks: list[tuple[str, object]] = field(default_factory=list)

    def add(self, kind: str, payload: object) -> None:
        self.blocks.append((kind, payload))

    def to_markdown(self) -> str:
        out = []
        for kind, payload in self.blocks:
            if kind in ("h1", "h2", "h3"):
                out.append(f"{'#' * int(kind[1])} {payload}")
            elif kind in ("p", "verdict"):
                out.append(str(payload) if kind == "p" else f"> {payload}")
            elif kind == "table":
                out.append(_markdown_table(payload))
            elif kind == "image":
                path, caption = payload
                out.append(f"![{caption}]({Path(path).name})\n\n*{caption}*")
        return "\n\n".join(out) + "\n"

    def to_html(self, title: str) -> str:
        body = []
        for kind, payload in self.blocks:
            if kind in ("h1", "h2", "h3"):
                body.append(f"<{kind}>{html.escape(str(payload))}</{kind}>")
            elif kind == "p":
                body.append(f"<p>{html.escape(str(payload))}</p>")
            elif kind == "verdict":
                body.append(f'<p class="verdict">{html.escape(str(payload))}</p>')
            elif kind == "table":
                body.append(_html_table(payload))
            elif kind == "image":
                path, caption = payload
                data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
                body.append(
                    f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                )
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
            f"</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
        )


def _markdown_table(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = [
        "| " + " | ".join(format_cell(v).replace("|", "\\|") for v in row) + " |"
        for row in df.itertuples(index=False)
    ]
    return "\n".join([header, rule, *rows])


def _html_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            text = format_cell(v)
            missing = text == "—" or (isinstance(v, str) and v.startswith("missing"))
            cells.append(f"<td{' class=missing' if missing else ''}>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    body = "".join(rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
