"""The card as a document: a title, a summary and a list of blocks, rendered by `render`.

The sections build blocks, never markup: one list of blocks is rendered as Markdown and as HTML,
so the two never disagree. Inline markup in text is `**bold**` and `` `code` `` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    """Text with `**bold**` and `` `code` `` as the only inline markup."""

    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Figure:
    """A PNG shown in the card; `path` is where it is, read when the HTML embeds it."""

    path: Path
    caption: str


Block = Heading | Paragraph | Bullets | Table | Figure


@dataclass(frozen=True)
class Card:
    title: str
    summary: str  # a few lines of Markdown: the registry version's description
    blocks: tuple[Block, ...]

    @property
    def figures(self) -> list[Figure]:
        return [b for b in self.blocks if isinstance(b, Figure)]
