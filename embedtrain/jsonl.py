"""JSON-lines reading with one clear line for a bad line (used by data readers and evaluation alike)."""

from __future__ import annotations

import json
from typing import Any, Iterator

from embedtrain.errors import EmbedtrainError


def json_lines(text: str, source: object, hint: str = "each line must be one JSON object") -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of JSON-lines ``text``; a line that is not JSON raises
    ``{source}:{line}: not valid JSON; {hint}``."""
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            raise EmbedtrainError(f"{source}:{line_no}: not valid JSON; {hint}") from None
        yield line_no, value
