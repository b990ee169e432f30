"""Uniformly random solved Sudoku boards (randomised backtracking) and unique-solution puzzles."""
from __future__ import annotations

import random

import torch
from tqdm import tqdm

from prism_ds.sudoku.board import BoardSpec


class _Solver:
    """Bitmask backtracking over an n x n board; counts solutions or fills a random one."""

    def __init__(self, spec: BoardSpec):
        n = self.n = spec.n
        self.box_of = [(r // spec.box_rows) * spec.box_rows + c // spec.box_cols for r in range(n) for c in range(n)]
        self.full = (1 << n) - 1

    def _setup(self, cells: list[int]):
        n, rows, cols, boxes = self.n, [0] * self.n, [0] * self.n, [0] * self.n
        for i, v in enumerate(cells):
            if v:
                bit = 1 << (v - 1)
                r, c, b = i // n, i % n, self.box_of[i]
                if rows[r] & bit or cols[c] & bit or boxes[b] & bit:
                    return None
                rows[r] |= bit; cols[c] |= bit; boxes[b] |= bit
        return rows, cols, boxes

    def solve(self, cells: list[int], rng: random.Random | None, limit: int) -> tuple[int, list[int] | None]:
        """Return (number of solutions up to limit, first solution found); rng randomises digit order."""
        state = self._setup(cells)
        if state is None:
            return 0, None
        rows, cols, boxes = state
        cells, n, found = list(cells), self.n, [0, None]

        def recurse() -> bool:
            best, best_free, best_count = -1, 0, n + 1
            for i, v in enumerate(cells):  # most-constrained cell first keeps the search shallow
                if v == 0:
                    free = self.full & ~(rows[i // n] | cols[i % n] | boxes[self.box_of[i]])
                    count = bin(free).count("1")
                    if count < best_count:
                        best, best_free, best_count = i, free, count
                        if count <= 1:
                            break
            if best < 0:
                found[0] += 1
                if found[1] is None:
                    found[1] = list(cells)
                return found[0] >= limit
            digits = [d for d in range(1, n + 1) if best_free >> (d - 1) & 1]
            if rng is not None:
                rng.shuffle(digits)
            r, c, b = best // n, best % n, self.box_of[best]
            for d in digits:
                bit = 1 << (d - 1)
                cells[best] = d; rows[r] |= bit; cols[c] |= bit; boxes[b] |= bit
                if recurse():
                    return True
                cells[best] = 0; rows[r] &= ~bit; cols[c] &= ~bit; boxes[b] &= ~bit
            return False

        recurse()
        return found[0], found[1]


def random_solutions(spec: BoardSpec, count: int, seed: int, progress: bool = True) -> torch.Tensor:
    """`count` solved boards as [count, seq_len] tokens, each an independent randomised backtracking fill."""
    rng, solver = random.Random(seed), _Solver(spec)
    grids = []
    for _ in tqdm(range(count), desc=f"solved {spec.n}x{spec.n} boards", disable=not progress):
        grids.append(solver.solve([0] * spec.n ** 2, rng, limit=1)[1])
    return spec.to_tokens(torch.tensor(grids).view(count, spec.n, spec.n))


def make_puzzles(spec: BoardSpec, count: int, blanks: int, seed: int, progress: bool = True) -> torch.Tensor:
    """`count` puzzles with exactly `blanks` blanks and a unique solution, as [count, seq_len] tokens."""
    cells = spec.n ** 2
    if not 0 < blanks < cells:
        raise ValueError(f"blanks={blanks} must be between 1 and {cells - 1} for a {spec.n}x{spec.n} board")
    rng, solver = random.Random(seed), _Solver(spec)
    puzzles, attempts = [], 0
    bar = tqdm(total=count, desc=f"{spec.n}x{spec.n} puzzles with {blanks} blanks", disable=not progress)
    while len(puzzles) < count:
        attempts += 1
        if attempts > 50 * count + 100:
            raise RuntimeError(f"could not reach {blanks} blanks with a unique solution; use fewer blanks")
        board = solver.solve([0] * cells, rng, limit=1)[1]
        order, removed = list(range(cells)), 0
        rng.shuffle(order)
        for i in order:  # remove clues greedily, keeping the solution unique
            if removed == blanks:
                break
            digit, board[i] = board[i], 0
            if solver.solve(board, None, limit=2)[0] == 1:
                removed += 1
            else:
                board[i] = digit
        if removed == blanks:
            puzzles.append(board)
            bar.update(1)
    bar.close()
    return spec.to_tokens(torch.tensor(puzzles).view(count, spec.n, spec.n))
