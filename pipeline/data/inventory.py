"""What the raw folder holds against the label and list files: which images are usable, and which
are listed but missing, present but unlisted, and so on; and those findings in words."""

from __future__ import annotations

from typing import Any

import pandas as pd

EXAMPLES = 10  # names listed per inventory problem in split_stats.json


def take_inventory(table: pd.DataFrame, train_val: list[str], test: list[str], present: set[str]) -> dict:
    """Which names are usable, and which are listed but missing, present but unlisted, and so on."""
    labelled = set(table["image"])
    listed = set(train_val) | set(test)
    return {
        "usable": labelled & listed & present,
        "listed_images": len(listed),
        "listed_missing": examples(listed - present),
        "present_unlisted": examples(present - listed),
        "listed_unlabelled": examples((listed & present) - labelled),
        "labelled_unlisted": examples((labelled & present) - listed),
    }


def inventory_notes(stats: dict[str, Any], raw: str = "the raw folder") -> list[str]:
    """One sentence per inventory problem in split_stats.json (`stats`), e.g. "111,900 of 112,120
    listed images are not in data/raw: a partial download? (first: 00000001_000.png, ...)"."""
    listed = int(stats.get("listed_images", 0) or 0)
    notes = []
    for key, text in (
        ("listed_missing", f"{{n}} of {listed:,} listed images are not in {raw}: a partial download?"),
        ("present_unlisted", f"{{n}} images in {raw} are in neither list file and were left out"),
        ("listed_unlabelled", "{n} listed images have no row in the label file and were left out"),
        ("labelled_unlisted", "{n} labelled images are in neither list file and were left out"),
    ):
        item = stats.get(key) or {}
        if item.get("count"):
            first = ", ".join(item.get("first", [])[:3])
            notes.append(text.format(n=f"{item['count']:,}") + (f" (first: {first}, ...)" if first else ""))
    return notes


def examples(names: set[str]) -> dict[str, Any]:
    return {"count": len(names), "first": sorted(names)[:EXAMPLES]}
