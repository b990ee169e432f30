"""Sudoku boards as token sequences, the paper's CSV format, and the validator.

Token ids equal CSV values: 0 = blank = mask, 1..n = digits, n+1 = row separator. For 9x9 this
is exactly the paper's 89-token layout (81 digits, 8 separators of value 10).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

MASK_ID = 0


@dataclass(frozen=True)
class BoardSpec:
    """An n x n board with boxes of box_rows x box_cols, n = box_rows * box_cols."""

    box_rows: int
    box_cols: int

    @property
    def n(self) -> int:
        return self.box_rows * self.box_cols

    @property
    def separator(self) -> int:
        return self.n + 1

    @property
    def vocab_size(self) -> int:
        return self.n + 2  # mask, n digits, separator

    @property
    def seq_len(self) -> int:
        return self.n * self.n + self.n - 1

    def digit_tokens(self) -> torch.Tensor:
        """Bool [vocab_size]: the tokens that may fill a cell (digits 1..n)."""
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        allowed[1:self.n + 1] = True
        return allowed

    def cell_positions(self) -> torch.Tensor:
        """Sequence index of every cell, row-major, skipping separators: shape [n*n]."""
        r, c = torch.meshgrid(torch.arange(self.n), torch.arange(self.n), indexing="ij")
        return (r * (self.n + 1) + c).flatten()

    def separator_mask(self) -> torch.Tensor:
        """Bool [seq_len]: True at row separators (structural tokens that are never masked)."""
        mask = torch.ones(self.seq_len, dtype=torch.bool)
        mask[self.cell_positions()] = False
        return mask

    def to_tokens(self, grids: torch.Tensor) -> torch.Tensor:
        """[B, n, n] digits (0 = blank) -> [B, seq_len] tokens with separators."""
        tokens = torch.full((grids.shape[0], self.seq_len), self.separator, dtype=torch.long)
        tokens[:, self.cell_positions()] = grids.reshape(grids.shape[0], -1).long()
        return tokens

    def to_grids(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, seq_len] tokens -> [B, n, n] cell values."""
        return tokens[:, self.cell_positions()].reshape(-1, self.n, self.n)


def is_solved(spec: BoardSpec, tokens: torch.Tensor, puzzle: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [B]: every row, column and box holds 1..n once, separators intact, and clues kept."""
    grids = spec.to_grids(tokens)
    n, full = spec.n, torch.arange(1, spec.n + 1)
    ok = ((grids >= 1) & (grids <= n)).flatten(1).all(1)
    ok &= (tokens[:, spec.separator_mask()] == spec.separator).all(1)
    # Regroup [B, n, n] into [B, n boxes, n cells] by (row-block, col-block).
    boxes = grids.reshape(-1, n // spec.box_rows, spec.box_rows, n // spec.box_cols, spec.box_cols)
    boxes = boxes.permute(0, 1, 3, 2, 4).reshape(-1, n, n)
    for groups in (grids, grids.transpose(1, 2), boxes):
        ok &= (groups.sort(dim=-1).values == full).all(-1).all(-1)
    if puzzle is not None:
        clues = puzzle != MASK_ID
        ok &= ((tokens == puzzle) | ~clues).all(1)
    return ok


def read_csv(path: str | Path, spec: BoardSpec) -> torch.Tensor:
    """Read boards in the paper's format (seq_len comma-separated ints per line); errors name file:line."""
    path = Path(path)
    rows = []
    with path.open("r", encoding="utf-8", errors="strict") as fh:
        for line_no, line in enumerate(fh, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                values = [int(v) for v in line.split(",")]
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: not a comma-separated list of integers ({exc})") from None
            if len(values) != spec.seq_len:
                raise ValueError(
                    f"{path}:{line_no}: board has {len(values)} values, expected {spec.seq_len} for a "
                    f"{spec.n}x{spec.n} board ({spec.n * spec.n} cells + {spec.n - 1} separators)")
            row = torch.tensor(values)
            seps = spec.separator_mask()
            if (row[seps] != spec.separator).any():
                raise ValueError(f"{path}:{line_no}: row separators must be {spec.separator} at every {spec.n + 1}th value")
            bad = (row[~seps] < 0) | (row[~seps] > spec.n)
            if bad.any():
                col = int(spec.cell_positions()[bad.nonzero()[0, 0]]) + 1
                raise ValueError(f"{path}:{line_no}: value {values[col - 1]} at column {col} is out of range 0..{spec.n}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no boards found")
    return torch.stack(rows)


def write_csv(path: str | Path, tokens: torch.Tensor) -> None:
    """Write boards as comma-separated ints, atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(",".join(map(str, row)) + "\n" for row in tokens.tolist()))
    tmp.replace(path)
