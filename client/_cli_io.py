"""Reading CLI inputs (items, user vectors) and writing results (rich table or JSON lines)."""
from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ._items import Item
from ._results import EncodedItems, RankedItem

TEXT_COLUMN_WIDTH = 48


class BadInput(ValueError):
    """A CLI argument or input file is unusable (exit code 2)."""


class OutputFormat(str, Enum):
    table = "table"
    jsonl = "jsonl"


def resolve_format(choice: OutputFormat | None) -> OutputFormat:
    """Tables for people at a terminal, JSON lines for pipes."""
    if choice is not None:
        return choice
    return OutputFormat.table if sys.stdout.isatty() else OutputFormat.jsonl


def pairs_to_items(texts: Sequence[str], images: Sequence[Path]) -> list[Item]:
    if len(texts) != len(images):
        raise BadInput(f"got {len(texts)} --text but {len(images)} --image: give them in pairs")
    return [Item(t, Path(i)) for t, i in zip(texts, images)]


def read_items_jsonl(path: Path) -> list[Item]:
    """Lines of {"text": ..., "image": path, "id": ...}; image paths are relative to the file's folder."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise BadInput(f"cannot read {path}: {err.strerror or err}") from None
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise BadInput(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) \
                or not isinstance(record.get("image"), str):
            raise BadInput(f'{path}:{number}: expected {{"text": str, "image": path, "id": optional}}')
        image = Path(record["image"])
        item_id = record.get("id")
        items.append(Item(record["text"], image if image.is_absolute() else Path(path).parent / image,
                          None if item_id is None else str(item_id)))
    if not items:
        raise BadInput(f"{path} has no items")
    return items


def collect_items(texts: Sequence[str] | None, images: Sequence[Path] | None, items_file: Path | None,
                  what: str = "items") -> list[Item]:
    items = pairs_to_items(texts or [], images or [])
    if items_file is not None:
        items += read_items_jsonl(items_file)
    if not items:
        raise BadInput(f"no {what}: give --text T --image PATH pairs or --items FILE.jsonl")
    return items


def read_user_vector(path: Path) -> np.ndarray:
    """A .npy holding a user vector [D], or item embeddings [N, D] whose mean is the user."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise BadInput(f"cannot read user vector {path}: {err}") from None
    if array.ndim == 2 and len(array):
        return array.astype(np.float32).mean(axis=0)
    if array.ndim != 1:
        raise BadInput(f"{path} holds shape {array.shape}: expected a user vector [D] or embeddings [N, D]")
    return array.astype(np.float32)


def _short(text: str) -> str:
    return text if len(text) <= TEXT_COLUMN_WIDTH else text[: TEXT_COLUMN_WIDTH - 1] + "…"


def _label(item: Item, index: int) -> str:
    return item.item_id if item.item_id is not None else str(index)


def ranked_rows(ranked: Iterable[RankedItem], items: Sequence[Item]) -> list[dict[str, Any]]:
    return [{"rank": r + 1, "index": x.index, "id": items[x.index].item_id, "text": items[x.index].text,
             "score": x.score} for r, x in enumerate(ranked)]


def recommended_rows(ranked: Iterable[RankedItem]) -> list[dict[str, Any]]:
    return [{"rank": r + 1, "id": x.item_id, "row": x.index, "score": x.score} for r, x in enumerate(ranked)]


def encoded_rows(encoded: EncodedItems, items: Sequence[Item], top: int = 3) -> list[dict[str, Any]]:
    return [{"index": i, "id": item.item_id, "text": item.text, "alignment": float(encoded.alignment[i]),
             "interests": [[name, p] for name, p in interests],
             "embedding": encoded.item_embedding[i].tolist()}
            for i, (item, interests) in enumerate(zip(items, encoded.top_interests(top)))]


def write_jsonl(rows: Iterable[dict[str, Any]]) -> None:
    for row in rows:
        sys.stdout.write(json.dumps(row) + "\n")


def write_score_table(rows: Sequence[dict[str, Any]], items: Sequence[Item]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("rank", "item", "text", "score")
    for row in rows:
        table.add_row(str(row["rank"]), _label(items[row["index"]], row["index"]), _short(row["text"]),
                      f"{row['score']:.4f}")
    Console().print(table)


def write_encode_table(rows: Sequence[dict[str, Any]], items: Sequence[Item]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("item", "text", "top interests", "alignment")
    for row in rows:
        interests = ", ".join(f"{name} {p:.2f}" for name, p in row["interests"])
        table.add_row(_label(items[row["index"]], row["index"]), _short(row["text"]), interests,
                      f"{row['alignment']:.3f}")
    Console().print(table)


def write_recommend_table(rows: Sequence[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("rank", "item", "score")
    for row in rows:
        table.add_row(str(row["rank"]), str(row["id"]), f"{row['score']:.4f}")
    Console().print(table)
