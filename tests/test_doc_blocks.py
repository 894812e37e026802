"""Every number in README.md and docs/ traces to a committed results file.

Fast (no server, no export): each generated block is re-rendered from its committed results file
and must equal what the file shows; outside the blocks, a measurement-looking number (ms, ×,
items/s, MiB, %, a cosine, a bare decimal in a table) fails unless ALLOWED_PHRASES names it as a
setting. `python -m mmrec.benchmarks.doc_blocks render` fixes the first kind; the second is fixed
by moving the number into a block or by writing the sentence without it.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest

from mmrec.benchmarks import doc_blocks
from mmrec.benchmarks.doc_blocks import (BLOCKS, REPO_ROOT, blocks_in, config_files, doc_files, rewrite, stale_blocks,
                                         typed_numbers)

DOCS = doc_files()
RENDERED = [*DOCS, *config_files()]


def _name(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


@pytest.mark.parametrize("path", RENDERED, ids=_name)
def test_every_generated_block_equals_its_committed_results(path):
    stale = stale_blocks(path)
    diffs = ["\n".join(difflib.unified_diff(shown.splitlines(), rendered.splitlines(), f"{name} (in the file)",
                                            f"{name} (rendered now)", lineterm="", n=1))
             for name, shown, rendered in stale]
    assert not stale, (f"{_name(path)}: stale block(s); run `python -m mmrec.benchmarks.doc_blocks render`\n"
                       + "\n".join(diffs)[:4000])


@pytest.mark.parametrize("path", DOCS, ids=_name)
def test_no_measurement_is_typed_outside_generated_blocks(path):
    found = typed_numbers(path)
    assert not found, ("measurement-looking numbers outside generated blocks (render them from a results file, "
                       "or write the sentence without the number; a setting goes into ALLOWED_PHRASES with its "
                       "reason):\n" + "\n".join(map(str, found)))


def test_every_block_marker_is_registered_and_every_rendered_block_is_used():
    """A marker the registry does not know would be skipped silently; a registered block that no
    document shows is dead code."""
    used = set()
    for path in RENDERED:
        text = path.read_text()
        unknown = set(re.findall(r"<!-- /?doc-block:([\w-]+) -->", text)) - set(BLOCKS)
        assert not unknown, f"{_name(path)}: unregistered doc blocks {unknown}"
        used |= {f.block.name for f in blocks_in(text, _name(path))}
    assert {name for name, block in BLOCKS.items()} <= used, set(BLOCKS) - used


def test_every_block_is_rendered_from_committed_results_files():
    for name, block in BLOCKS.items():
        for source in block.sources:
            assert source.startswith("benchmarks/results/"), (name, source)
            assert (REPO_ROOT / source).is_file(), f"{name}: {source} is not committed ({block.regenerate})"


def test_every_allowed_phrase_is_still_in_its_file():
    for (file, phrase), why in doc_blocks.ALLOWED_PHRASES.items():
        text = "\n".join(line for _, line in doc_blocks.prose_lines((REPO_ROOT / file).read_text()))
        assert phrase in text, f"{file}: allowed phrase {phrase!r} ({why}) is gone: drop it from ALLOWED_PHRASES"


TYPED = """# A page

Merged, Triton is 1.8 ms under the in-process pipeline.
Throughput was 0.96× the thread pool, 64.9 items/s at 2.2 GB RSS (+3.7 %).
Image INT8 reaches cosine 0.993 and accuracy 0.79 → 0.85; restart took 7–15 s.

| concurrency | items/s | p50 / p99 ms |
|---|---|---|
| 8 | 34.3 | 241.1 / 333.9 |
"""
NOT_TYPED = """# A page

Gates: mean cosine ≥ 0.99, a 95 % bootstrap interval, batch 1/8/32, a 640×427 JPEG, 12 MP photos.
Config values are code: `max_queue_delay_microseconds: 500`, `2816Mi`, `30000` ms.

```bash
mmrec bench --seconds 2.5   # 1.8 ms in a code block is a command, not prose
```

<!-- doc-block:runtimes -->
| text b=1 | 1.73× slower | 4513 ms |
<!-- /doc-block:runtimes -->
"""


def test_the_scan_flags_typed_measurements(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(TYPED)
    found = {(t.line, t.kind) for t in typed_numbers(page, root=tmp_path)}
    assert {(3, "latency"), (4, "speed-up"), (4, "rate"), (4, "memory"), (4, "percent"), (5, "quality"),
            (5, "seconds"), (9, "table-value")} <= found, found


def test_the_scan_leaves_settings_code_and_blocks_alone(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(NOT_TYPED)
    assert typed_numbers(page, root=tmp_path) == []


def test_rewrite_replaces_only_block_bodies_and_is_idempotent(tmp_path):
    page = tmp_path / "page.md"
    block = BLOCKS["cross-cpu-training"]
    head, tail = "# Title\n\nProse before.\n\n", "\n\nProse after, with `code`.\n"
    page.write_text(f"{head}{block.begin}\nstale text typed by hand\n{block.end}{tail}")
    assert rewrite(page) == ["cross-cpu-training"]
    text = page.read_text()
    assert text == f"{head}{block.begin}\n{block.render_from()}\n{block.end}{tail}"
    assert rewrite(page) == [] and page.read_text() == text
    assert stale_blocks(page) == []


def test_blocks_written_by_a_test_run_are_left_alone(tmp_path):
    """The bad-input matrix comes from the live-server test: rewrite never touches it."""
    page = tmp_path / "page.md"
    block = BLOCKS["bad-input-matrix"]
    text = f"{block.begin}\n| whatever | the test wrote |\n{block.end}\n"
    page.write_text(text)
    assert block.render is None and rewrite(page) == [] and page.read_text() == text and stale_blocks(page) == []


def test_a_block_without_its_end_marker_is_an_error(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"{BLOCKS['runtimes'].begin}\ntext\n")
    with pytest.raises(ValueError, match="has no"):
        rewrite(page)
