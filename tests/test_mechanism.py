"""The detection-mechanism measurement (prism_ds/sudoku/mechanism.py): metrics against brute force, the replayed
ReMDM-conf confidence against what the sampler itself stores, and leave-one-out against direct passes."""
from __future__ import annotations

import json

import pytest
import torch

import prism_ds.core.sampler as sampler_module
from prism_ds.config import ModelConfig, QualityHeadConfig, SamplerConfig
from prism_ds.core.metrics import auroc
from prism_ds.models.prism_model import build_model
from prism_ds.sudoku import mechanism as M
from prism_ds.sudoku.board import MASK_ID, BoardSpec, is_solved
from prism_ds.sudoku.generator import make_puzzles

SPEC = BoardSpec(2, 2)


@pytest.fixture(scope="module")
def setup():
    """A tiny random DiT and quality head, 24 4x4 puzzles with 10 blanks and their solutions."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=32, n_blocks=1, n_heads=2, cond_dim=16, dropout=0.0), QualityHeadConfig(),
                        SPEC.vocab_size, with_head=True, mask_id=MASK_ID).eval()
    for p in model.parameters():  # zero-init output layers would give uniform digits and tied qualities
        if not p.any():
            torch.nn.init.normal_(p, std=0.2)  # moderate probabilities
    puzzles = make_puzzles(SPEC, 24, 10, seed=0, progress=False)
    return model, puzzles, M.solutions_of(SPEC, puzzles)


def _cfg(**kw) -> SamplerConfig:
    return SamplerConfig(**{"batch_size": 24, "seed": 7, "remask_k": 2, **kw})


def _brute_auroc(s, pos, w):
    num = den = 0.0
    for i in range(len(s)):
        for j in range(len(s)):
            if pos[i] and not pos[j]:
                num += w[i] * w[j] * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
                den += w[i] * w[j]
    return num / den


def test_weighted_auroc_matches_pairwise_count():
    g = torch.Generator().manual_seed(1)
    s = torch.randint(0, 6, (40,), generator=g).double()  # many ties
    pos = torch.rand(40, generator=g) < 0.3
    w = torch.randint(0, 4, (5, 40), generator=g).double()  # bootstrap-like multiplicities, zeros included
    got = M.weighted_auroc(s, pos, w)
    want = torch.tensor([_brute_auroc(s.tolist(), pos.tolist(), row.tolist()) for row in w], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-12)
    assert float(M.weighted_auroc(s, pos, torch.ones(40))[0]) == pytest.approx(auroc(s, pos), abs=1e-12)
    assert M.weighted_auroc(s, torch.zeros(40, dtype=torch.bool), torch.ones(40)).isnan().all()


def test_state_auroc_matches_pairwise_count():
    g = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 4, (3, 5, 9), generator=g).double()
    cand = torch.rand(3, 5, 9, generator=g) < 0.7
    wrong = cand & (torch.rand(3, 5, 9, generator=g) < 0.4)
    scores = torch.where(cand, scores, torch.full_like(scores, float("nan")))
    got = M.state_auroc(scores, cand, wrong, chunk=4)  # chunk boundaries inside the batch
    for s in range(3):
        for b in range(5):
            c = cand[s, b]
            if wrong[s, b].any() and (c & ~wrong[s, b]).any():
                want = _brute_auroc((-scores[s, b][c]).tolist(), wrong[s, b][c].tolist(), [1.0] * int(c.sum()))
                assert float(got[s, b]) == pytest.approx(want, abs=1e-12)
            else:
                assert got[s, b].isnan()


def test_uniform_scores_are_chance_on_a_large_synthetic_set():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(50, 200, 16, generator=g, dtype=torch.float64)
    cand = torch.ones(50, 200, 16, dtype=torch.bool)
    wrong = torch.rand(50, 200, 16, generator=g) < 0.3
    assert float(M.weighted_auroc(-scores.flatten(), wrong.flatten(), torch.ones(scores.numel()))[0]) == \
        pytest.approx(0.5, abs=0.01)
    prec, elig = M.precision_at_k(scores, cand, wrong, 2, g)
    assert elig.all() and float(prec.mean()) == pytest.approx(float(wrong.double().mean()), abs=0.01)


def test_oracle_scorer_is_perfect_and_summary_is_consistent(setup):
    model, puzzles, solutions = setup
    oracle = {"oracle": lambda tokens, fixed: -(tokens != solutions).double(),  # lower = wrong
              "prism copy": lambda tokens, fixed: model(tokens, need_logits=False, need_quality=True).quality}
    rec = M.measure(model, SPEC, puzzles, solutions, 4, _cfg(), extra_scorers=oracle, progress=False)
    assert rec.wrong.sum() > 5 and (rec.cand & ~rec.wrong).sum() > 5  # a random model errs: both classes exist
    assert not rec.cand[0].any()  # the puzzle itself has no clean non-fixed cell
    prec, elig = M.precision_at_k(rec.scores["oracle"], rec.cand, rec.wrong, 2)
    best = rec.wrong.sum(-1).clamp(max=2).double() / 2
    assert elig.any() and torch.equal(prec[elig], best[elig])
    summary = M.summarize(rec, 2, n_boot=50, progress=False)
    o = summary["scores"]["oracle"]
    assert o["auroc"] == 1.0 and o["within"] == 1.0 and o["auroc_ci"] == [1.0, 1.0]
    assert summary["scores"]["prism"]["auroc_diff"] == 0.0 and summary["reference"] == "prism"
    assert set(summary["scores"]) == {"confidence", "prism", "loo", "uniform", "oracle", "prism copy"}
    copy = summary["scores"]["prism copy"]  # paired: the same resamples for every score, so a copy differs by 0
    assert copy["auroc_diff_ci"] == [0.0, 0.0] and copy["within_diff_ci"] == [0.0, 0.0]
    assert copy["precision_diff_ci"] == [0.0, 0.0] and copy["auroc_ci"][1] > copy["auroc_ci"][0]
    for r in summary["scores"].values():
        assert r["auroc_ci"][0] <= r["auroc"] <= r["auroc_ci"][1]
    c = summary["counts"]
    assert c["cells"] == int(rec.cand.sum()) and c["wrong_cells"] == int(rec.wrong.sum()) and c["trajectories"] == 24
    h = summary["high_conf_errors"]
    assert h["wrong"] == int(rec.final_wrong.sum())
    assert h["high"] == int((rec.final_wrong & (rec.final_conf >= 0.9)).sum())
    json.dumps(M.to_jsonable(summary), allow_nan=False)
    assert "| PRISM g (current board) |" in M.format_markdown(summary)


def test_replayed_confidence_equals_what_the_sampler_stores(setup, monkeypatch):
    """Run remdm-conf (it remasks, so stored confidences must survive remasking and be replaced on refilling) at a
    temperature and nucleus that change the stored probability, and record the sampler's own drawn_prob."""
    model, puzzles, solutions = setup
    drawn, real_draw = [], sampler_module._draw

    def spy(logits, rows, cols, *args, **kw):
        tokens, prob, conf = real_draw(logits, rows, cols, *args, **kw)
        assert kw["need_drawn_prob"] and logits.shape[:2] == puzzles.shape  # every row, every column
        dense = torch.full(puzzles.shape, float("nan"), dtype=torch.float64)
        dense[rows, cols] = conf
        drawn.append(dense)
        return tokens, prob, conf

    monkeypatch.setattr(sampler_module, "_draw", spy)
    rec = M.measure(model, SPEC, puzzles, solutions, 4, _cfg(temperature=0.7, top_p=0.9), variant="remdm-conf",
                    progress=False)
    fixed = puzzles != MASK_ID
    states, expect = rec.states, torch.ones(puzzles.shape, dtype=torch.float64)
    remasked = 0
    for s in range(len(states)):
        if s + 1 < len(states):
            new = (states[s] == MASK_ID) & (states[s + 1] != MASK_ID) & ~fixed
            remasked += int(((states[s] != MASK_ID) & (states[s + 1] == MASK_ID)).sum())
        else:
            new = (states[s] == MASK_ID) & ~fixed  # the last step fills every mask
        expect = torch.where(new, drawn[s], expect)
        if s + 1 < len(states):
            cand = rec.cand[s + 1]
            assert torch.allclose(rec.scores["confidence"][s + 1][cand], expect[cand], atol=1e-9)
    assert remasked > 0  # the trajectory really remasked
    assert torch.allclose(rec.final_conf[~fixed], expect[~fixed], atol=1e-9)
    assert (expect[~fixed] < 0.999).any()  # not a trivial all-ones comparison


def test_leave_one_out_equals_a_direct_pass(setup):
    model, puzzles, solutions = setup
    rec = M.measure(model, SPEC, puzzles, solutions, 4, _cfg(), progress=False)
    digits = SPEC.digit_tokens()
    s = 2
    checked = 0
    for b, i in rec.cand[s].nonzero().tolist()[:12]:
        board = rec.states[s][b].clone()
        token = int(board[i])
        board[i] = MASK_ID
        with torch.no_grad():
            logits = model(board[None], need_logits=True, need_quality=False).logits[0, i].double()
        direct = logits[digits].softmax(-1)[token - 1]  # digits 1..n are vocabulary ids 1..n
        # float32 passes of a 1-board batch vs a batch of copies differ by ~1e-7
        assert float(rec.scores["loo"][s, b, i]) == pytest.approx(float(direct), abs=1e-6)
        checked += 1
    assert checked == 12
    with torch.no_grad():  # chunk boundaries do not change anything
        a = M.leave_one_out(model, rec.states[s], rec.cand[s], digits, chunk=5)
    assert torch.allclose(a[rec.cand[s]], rec.scores["loo"][s][rec.cand[s]], atol=1e-6)


def test_trajectories_are_the_evaluation_samplers(setup):
    """Several batches share one random stream, as in evaluate.solve: the same seed gives the same boards."""
    from prism_ds.sudoku.evaluate import solve

    model, puzzles, solutions = setup
    cfg = _cfg(batch_size=10)
    rec = M.measure(model, SPEC, puzzles, solutions, 4, cfg, progress=False)
    assert torch.equal(rec.final, solve(model, SPEC, puzzles, 4, "none", cfg))
    assert torch.equal(rec.final_wrong, (rec.final != solutions) & (puzzles == MASK_ID))


def test_solutions_are_unique_and_checked(setup):
    _, puzzles, solutions = setup
    assert is_solved(SPEC, solutions, puzzles).all()
    with pytest.raises(ValueError, match="puzzle 0: several solutions"):
        M.solutions_of(SPEC, torch.zeros(1, SPEC.seq_len, dtype=torch.long).masked_fill(SPEC.separator_mask(),
                                                                                          SPEC.separator))
