"""Board tokenisation, CSV I/O with clear errors, generator and validator."""
import pytest
import torch

from prism_ds.sudoku.board import BoardSpec, is_solved, read_csv, write_csv
from prism_ds.sudoku.generator import _Solver, make_puzzles, random_solutions

SPECS = [BoardSpec(2, 2), BoardSpec(2, 3), BoardSpec(3, 3)]


def test_9x9_layout_is_the_papers_89_tokens():
    spec = BoardSpec(3, 3)
    assert (spec.seq_len, spec.separator, spec.vocab_size) == (89, 10, 11)
    tokens = spec.to_tokens(torch.arange(81).remainder(9).add(1).view(1, 9, 9))
    assert tokens[0, 9].item() == 10 and tokens[0, 19].item() == 10 and tokens[0, :9].tolist() == list(range(1, 10))
    assert torch.equal(spec.to_grids(tokens), torch.arange(81).remainder(9).add(1).view(1, 9, 9))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.n}x{s.n}")
def test_generated_boards_are_valid_and_diverse(spec):
    boards = random_solutions(spec, 200, seed=0, progress=False)
    assert is_solved(spec, boards).all()
    assert len({tuple(b) for b in boards.tolist()}) > (150 if spec.n > 4 else 100)
    # Randomised backtracking, not relabelled copies of one pattern: first rows vary in structure.
    first_rows = {tuple(b) for b in spec.to_grids(boards)[:, 0].tolist()}
    assert len(first_rows) > 20


@pytest.mark.parametrize("spec,blanks", [(BoardSpec(2, 2), 10), (BoardSpec(2, 3), 22), (BoardSpec(3, 3), 51)],
                         ids=["4x4", "6x6", "9x9"])
def test_puzzles_have_exact_blanks_and_a_unique_solution(spec, blanks):
    puzzles = make_puzzles(spec, 20, blanks, seed=1, progress=False)
    assert ((puzzles == 0).sum(1) == blanks).all()
    solver = _Solver(spec)
    for row in spec.to_grids(puzzles).flatten(1).tolist():
        count, solution = solver.solve(row, None, limit=2)
        assert count == 1
        full = spec.to_tokens(torch.tensor(solution).view(1, spec.n, spec.n))
        assert is_solved(spec, full, spec.to_tokens(torch.tensor(row).view(1, spec.n, spec.n))).all()


def test_validator_rejects_each_kind_of_mistake():
    spec = BoardSpec(2, 3)
    board = random_solutions(spec, 1, seed=3, progress=False)
    grid = spec.to_grids(board)[0]
    assert is_solved(spec, board).item()
    swapped_in_row = grid.clone()
    swapped_in_row[0, [0, 1]] = swapped_in_row[0, [1, 0]]  # rows stay valid, columns break
    swapped_rows = grid.clone()
    swapped_rows[[1, 2]] = swapped_rows[[2, 1]]  # rows 1 and 2 are in different boxes: boxes break
    duplicate = grid.clone()
    duplicate[0, 0] = duplicate[0, 1]
    for bad in (swapped_in_row, swapped_rows, duplicate):
        assert not is_solved(spec, spec.to_tokens(bad[None])).item()
    broken_separator = board.clone()
    broken_separator[0, 6] = 1
    assert not is_solved(spec, broken_separator).item()
    # A different valid board that ignores a clue is not a solution of the puzzle.
    puzzle = board.clone()
    other = random_solutions(spec, 1, seed=4, progress=False)
    assert is_solved(spec, other).item() and not is_solved(spec, other, puzzle).item()
    assert not is_solved(spec, spec.to_tokens(torch.zeros(1, 6, 6, dtype=torch.long))).item()


def test_csv_round_trip(tmp_path):
    spec = BoardSpec(3, 3)
    puzzles = make_puzzles(spec, 3, 51, seed=0, progress=False)
    write_csv(tmp_path / "p.csv", puzzles)
    assert torch.equal(read_csv(tmp_path / "p.csv", spec), puzzles)


@pytest.mark.parametrize("line,message", [
    ("1,2,x", r"bad.csv:2: not a comma-separated list of integers"),
    ("1,2,3", r"bad.csv:2: board has 3 values, expected 89"),
    (",".join(["5"] * 89), r"bad.csv:2: row separators must be 10"),
    (",".join((["12"] + ["5"] * 8 + ["10"]) * 8 + ["5"] * 9), r"bad.csv:2: value 12 at column 1 is out of range 0..9"),
])
def test_bad_csv_rows_name_file_and_line(tmp_path, line, message):
    spec = BoardSpec(3, 3)
    good = ",".join(map(str, make_puzzles(spec, 1, 40, seed=0, progress=False)[0].tolist()))
    (tmp_path / "bad.csv").write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_csv(tmp_path / "bad.csv", spec)


def test_table_reports_mean_over_seeds_intervals_and_the_paired_lead_over_the_strongest_baseline():
    from prism_ds.sudoku.evaluate import format_table

    def row(policy, seed, solved):
        return {"steps": 4, "policy": policy, "seed": seed, "n": len(solved), "success": sum(solved) / len(solved),
                "solved": "".join(map(str, solved))}

    rows = [row("none", 0, [0, 0, 1, 0]), row("none", 1, [0, 1, 0, 0]),
            row("remdm", 0, [1, 0, 1, 0]), row("remdm", 1, [1, 0, 1, 1]),
            row("remdm-conf:per-token", 0, [0, 0, 1, 1]), row("remdm-conf:per-token", 1, [0, 0, 1, 0]),
            row("prism", 0, [1, 1, 1, 0]), row("prism", 1, [1, 1, 1, 1])]
    table = format_table(rows)
    # remdm: per-puzzle means [1, 0, 1, .5] -> 62.5%, sd 0.4787, half-width 1.96 * 0.4787 / 2 = 0.469
    assert "| remdm | 62.5 ± 46.9 |" in table and "mean over 2 sampler seed(s)" in table
    # Strongest baseline is remdm (62.5 > 37.5); prism - remdm per puzzle: [0, 1, 0, 0] -> +25.0 ± 49.0
    assert "4 steps: prism − strongest baseline (remdm) = +25.0 points" in table
    assert "-24.0 to +74.0" in table
    # ... and against every row: prism - none per puzzle [1, .5, .5, .5] -> +62.5, sd 0.25, half-width 24.5
    assert "| none | +62.5 [+38.0, +87.0] |" in table and "| remdm | +25.0 [-24.0, +74.0] |" in table


def test_unknown_policy_or_count_is_named():
    from prism_ds.core.remask import parse_variant

    assert parse_variant("remdm:binomial") == ("remdm", "binomial")
    assert parse_variant("prism", "per-token") == ("prism", "per-token")
    with pytest.raises(ValueError, match="sampler.policy='remdmx'"):
        parse_variant("remdmx")
    with pytest.raises(ValueError, match="remask count 'poisson'"):
        parse_variant("remdm:poisson")


def test_project_license_is_an_spdx_string():
    """A table here makes setuptools print a deprecation banner on every install (the newcomer's first screen)."""
    import tomllib
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
