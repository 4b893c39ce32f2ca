"""The card rendered twice from one list of blocks: Markdown beside the reports, one HTML page.

The Markdown links its images relative to the folder it is written to; the HTML page embeds them
(base64), so it reads the same wherever it is opened (the registry's artifact viewer, a mail).
The HTML comes from a Jinja2 template with autoescaping on: every text is escaped once, and the
card's only inline markup (`**bold**`, `` `code` ``) becomes tags in the `inline` filter.
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from ..io import write_text
from .document import Bullets, Card, Figure, Heading, Paragraph, Table

CARD_MD, CARD_HTML = "model_card.md", "model_card.html"  # written into the reports folder
TEMPLATE = "card.html.j2"

_INLINE = re.compile(r"\*\*(.+?)\*\*|`([^`]+)`")
_NUMERIC = re.compile(r"^(n/a|[\s\d.,+\-\[\]*]*)$")  # a count, a figure, an interval


def to_markdown(card: Card, folder: Path) -> str:
    """The card as Markdown whose images are linked relative to `folder`, where it will be written."""
    out: list[str] = []
    for block in card.blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            out.append(block.text)
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            out.append(_markdown_table(block))
        elif isinstance(block, Figure):
            out.append(f"![{block.caption}]({figure_link(block, folder)})")
    return "\n\n".join(out) + "\n"


def figure_link(figure: Figure, folder: Path) -> str:
    """Where `figure` is, relative to `folder`, with forward slashes."""
    return Path(os.path.relpath(Path(figure.path).resolve(), Path(folder).resolve())).as_posix()


def _markdown_table(table: Table) -> str:
    cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(cell(h) for h in table.header) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.rows]
    return "\n".join(lines)


def inline_html(text: str) -> str:
    """Escape `text` for HTML, then turn `**bold**` and `` `code` `` into tags."""
    parts, last = [], 0
    for m in _INLINE.finditer(text):
        parts.append(html.escape(text[last : m.start()]))
        if m.group(1) is not None:
            parts.append(f"<strong>{inline_html(m.group(1))}</strong>")
        else:
            parts.append(f"<code>{html.escape(m.group(2))}</code>")
        last = m.end()
    parts.append(html.escape(text[last:]))
    return "".join(parts)


def numeric_columns(table: Table) -> list[bool]:
    """Which columns hold numbers (and n/a) only, right-aligned so that a text column keeps one
    alignment; the first column always names the row."""
    return [j > 0 and all(_NUMERIC.match(str(row[j])) for row in table.rows) for j in range(len(table.header))]


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


@cache
def _environment():
    import jinja2
    from markupsafe import Markup

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["inline"] = lambda text: Markup(inline_html(str(text)))
    env.filters["data_uri"] = data_uri
    env.globals["numeric_columns"] = numeric_columns
    return env


def to_html(card: Card) -> str:
    """The card as one HTML page with its images embedded (base64), readable wherever it is opened."""
    kinds = {Heading: "heading", Paragraph: "paragraph", Bullets: "bullets", Table: "table", Figure: "figure"}
    blocks = [(kinds[type(block)], block) for block in card.blocks]
    return _environment().get_template(TEMPLATE).render(title=card.title, blocks=blocks)


def write_card(card: Card, folder: Path) -> tuple[Path, Path]:
    """Write `folder`/model_card.md and model_card.html; the folder is the run's reports folder, so the
    Markdown's image links stay inside it (and inside the card's folder once logged with the model)."""
    markdown_path, html_path = Path(folder) / CARD_MD, Path(folder) / CARD_HTML
    write_text(markdown_path, to_markdown(card, markdown_path.parent))
    write_text(html_path, to_html(card))
    return markdown_path, html_path


def figure_files(card: Card, folder: Path) -> Iterable[tuple[Path, str]]:
    """(file, folder relative to the card's) of each figure that lies inside the card's folder: what
    must travel with the Markdown for its links to hold."""
    for figure in card.figures:
        link = figure_link(figure, folder)
        if not link.startswith("../"):
            yield Path(figure.path), str(Path(link).parent) if "/" in link else ""
