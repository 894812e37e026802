"""Real captioned images for training the fusion head and calibrating INT8: Tux Paint stamps.

Debian's `tuxpaint-stamps-default` (GPL-2) installs ~800 PNG drawings, each with an English
caption in a sibling .txt file, under category folders (animals, food, vehicles, ...). We read
them in place; nothing is copied into this repository.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

DEFAULT_STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
STAMPS_ENV = "MMREC_STAMPS_DIR"
MIN_ITEMS_PER_CATEGORY = 10
HELD_OUT_PERCENT = 20


@dataclass(frozen=True)
class Item:
    item_id: str  # path relative to the stamps folder, stable across machines
    caption: str
    image_path: Path
    category: str

    def image_bytes(self) -> bytes:
        return self.image_path.read_bytes()


def stamps_dir() -> Path:
    path = Path(os.environ.get(STAMPS_ENV, DEFAULT_STAMPS_DIR))
    if not path.is_dir():
        raise DataError(f"training images not found at {path}: install them with "
                        f"`apt-get install tuxpaint-stamps-default` or set {STAMPS_ENV}")
    return path


def _caption(txt: Path) -> str | None:
    try:
        first = txt.read_text(encoding="utf-8", errors="strict").splitlines()[0].strip()
    except (OSError, UnicodeDecodeError, IndexError):
        return None
    return first or None


def load_items(root: Path | None = None) -> list[Item]:
    """All PNG stamps with an English caption, in categories with enough items, sorted by id."""
    root = root or stamps_dir()
    items = []
    for png in sorted(root.rglob("*.png")):
        if png.stem.endswith(("_shadow", "_mirror", "_flip")):
            continue
        caption = _caption(png.with_suffix(".txt"))
        if caption is None:
            continue
        rel = png.relative_to(root)
        items.append(Item(rel.as_posix(), caption, png, rel.parts[0]))
    counts = Counter(i.category for i in items)
    items = [i for i in items if counts[i.category] >= MIN_ITEMS_PER_CATEGORY]
    if len(items) < 100:
        raise DataError(f"only {len(items)} captioned images under {root}; need at least 100")
    return items


def categories_of(items: list[Item]) -> tuple[str, ...]:
    return tuple(sorted({i.category for i in items}))


def is_held_out(item: Item) -> bool:
    """Deterministic split by content-independent id hash: same split on every machine."""
    digest = hashlib.sha256(item.item_id.encode()).digest()
    return digest[0] * 100 // 256 < HELD_OUT_PERCENT


def split(items: list[Item]) -> tuple[list[Item], list[Item]]:
    train = [i for i in items if not is_held_out(i)]
    held_out = [i for i in items if is_held_out(i)]
    return train, held_out


def dataset_fingerprint(items: list[Item]) -> str:
    """sha256 over ids, captions and image bytes: recorded in the manifest."""
    h = hashlib.sha256()
    for item in items:
        h.update(item.item_id.encode())
        h.update(item.caption.encode())
        h.update(hashlib.sha256(item.image_bytes()).digest())
    return h.hexdigest()
