"""Shared by the benchmarks: each one owns a section of BENCHMARKS.md between markers and rewrites it."""
from __future__ import annotations

import re
from pathlib import Path

HEADER = """# Benchmarks

Every figure here was measured by `make bench` (or the per-benchmark target named in each section)
on the machine named in the section, in the same run as the peers it is compared with.
Latency is the median of repeated runs after warm-up at a fixed thread count; a speedup is a ratio of
two such medians. Nothing is estimated: what was not measured says so.
"""


def update_section(path: str | Path, name: str, body: str) -> None:
    """Replace (or append) the section `name` of the Markdown file at `path`."""
    path = Path(path)
    text = path.read_text() if path.exists() else HEADER
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
