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
from typing import NamedTuple

import numpy as np
from PIL import Image

from .errors import DataError

DEFAULT_STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
STAMPS_ENV = "MMREC_STAMPS_DIR"
MIN_ITEMS_PER_CATEGORY = 10
HELD_OUT_PERCENT = 20
VALIDATION_PERCENT = 10
DHASH_SIZE = 8
NEAR_DUPLICATE_BITS = 4  # of 64: re-coloured or slightly shifted copies of one drawing


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


class Split(NamedTuple):
    """train: fits the head; validation: any tuning; held_out: reporting and gates only."""

    train: list[Item]
    validation: list[Item]
    held_out: list[Item]


def image_hash(item: Item) -> int:
    """64-bit difference hash of the picture flattened onto white: near-duplicates collide."""
    with Image.open(item.image_path) as image:
        rgba = image.convert("RGBA")
    flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat.alpha_composite(rgba)
    grey = np.asarray(flat.convert("L").resize((DHASH_SIZE + 1, DHASH_SIZE), Image.Resampling.BILINEAR),
                      dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).reshape(-1)
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def duplicate_groups(items: list[Item], image_hashes: list[int] | None = None) -> list[int]:
    """Group id per item: items joined by an equal caption or a near-equal image hash."""
    hashes = image_hashes if image_hashes is not None else [image_hash(i) for i in items]
    parent = list(range(len(items)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(a: int, b: int) -> None:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first_with_caption: dict[str, int] = {}
    for index, item in enumerate(items):
        key = " ".join(item.caption.lower().split())
        join(index, first_with_caption.setdefault(key, index))
    codes = np.array(hashes, dtype=np.uint64)
    for index in range(len(items)):
        distance = np.array([bin(int(x)).count("1") for x in codes[index + 1:] ^ codes[index]])
        for other in np.nonzero(distance <= NEAR_DUPLICATE_BITS)[0]:
            join(index, index + 1 + int(other))
    return [root(i) for i in range(len(items))]


def split(items: list[Item], image_hashes: list[int] | None = None) -> Split:
    """Stratified by category, grouped by duplicates, the same on every machine.

    In each category, duplicate groups are ordered by a hash of their first item id and dealt
    out: held-out first (HELD_OUT_PERCENT of the category's items, at least one group), then
    validation (VALIDATION_PERCENT), the rest to training. A group never straddles two parts,
    so a caption seen in training is never scored as held-out.
    """
    groups = duplicate_groups(items, image_hashes)
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    by_category: dict[str, list[list[int]]] = {}
    for indices in members.values():
        category = Counter(items[i].category for i in indices).most_common(1)[0][0]
        by_category.setdefault(category, []).append(indices)
    part_of: dict[int, str] = {}
    for category, category_groups in sorted(by_category.items()):
        category_groups.sort(key=lambda g: hashlib.sha256(items[g[0]].item_id.encode()).digest())
        total = sum(len(g) for g in category_groups)
        quotas = [("held_out", round(total * HELD_OUT_PERCENT / 100)),
                  ("validation", round(total * VALIDATION_PERCENT / 100))]
        filled = {"held_out": 0, "validation": 0}
        for position, group in enumerate(category_groups):
            last = position == len(category_groups) - 1  # training always learns every category
            part = "train" if last else next((name for name, quota in quotas
                                              if filled[name] < max(quota, 1)), "train")
            if part != "train":
                filled[part] += len(group)
            for index in group:
                part_of[index] = part
    return Split(*([item for index, item in enumerate(items) if part_of[index] == part]
                   for part in ("train", "validation", "held_out")))


def dataset_fingerprint(items: list[Item]) -> str:
    """sha256 over ids, captions and image bytes: recorded in the manifest."""
    h = hashlib.sha256()
    for item in items:
        h.update(item.item_id.encode())
        h.update(item.caption.encode())
        h.update(hashlib.sha256(item.image_bytes()).digest())
    return h.hexdigest()
