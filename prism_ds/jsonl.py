"""Reading JSON Lines files with errors that name the file and line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator


def jsonl_rows(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line; a malformed line is a ValueError naming file and line."""
    path = Path(path)
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not a JSON line ({e.msg})") from None
