"""Writing a benchmark's Markdown report without losing what was written there by hand."""

from __future__ import annotations

from pathlib import Path

from bdx_study._io import write_text_atomic


def write_keeping_tail(path: Path, generated: list[str], marker: str, placeholder: str = "") -> None:
    """Write ``generated`` to ``path`` (atomically), followed by the file's existing section that
    starts at the heading ``marker`` (e.g. "## Notes", written by hand), or ``placeholder`` when
    the file has none yet."""
    existing = path.read_text() if path.is_file() else ""
    at = existing.find("\n" + marker)
    tail = existing[at:] if at >= 0 else placeholder
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n".join(generated) + "\n" + tail)
