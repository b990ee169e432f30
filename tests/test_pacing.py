"""Threshold decoding's per-row pacing: a row whose block is filled moves on without waiting for the batch, finished
rows leave, K_block rounds stay per block, and a block never closes with a mask in it."""
import pytest
import torch

from prism_ds.core.sampler import SamplerSettings, SamplingRecord, sample
from prism_ds.core.schedules import BlockwiseSchedule
from prism_ds.models.prism_model import PrismOutput

MASK, V, PROMPT, GEN, BLOCK = 0, 9, 2, 16, 4
FAST, SLOW = 1, 2  # the first prompt token says how confident the model is on that row


class RowPaced(torch.nn.Module):
    """Confident (p ~ 1) on FAST rows, unsure (p < 0.5 everywhere) on SLOW rows; records rows and windows per pass."""

    supports_kv_cache = True

    def __init__(self):
        super().__init__()
        self.passes = []

    def forward(self, tokens, need_logits=True, need_quality=True, logits_cols=None, fill_cache=False, kv_cache=None,
                fresh=None, **_):
        self.passes.append({"rows": tokens[:, 0].tolist(), "fill": fill_cache, "fresh": fresh})
        cols = torch.arange(tokens.shape[1]) if logits_cols is None else logits_cols
        logits = torch.zeros(len(tokens), len(cols), V)
        logits[:, torch.arange(len(cols)), 3 + cols % 4] = 1.0  # a favourite per position, p = e / (e + 8) < 0.5
        logits[tokens[:, 0] == FAST] *= 40.0  # confident: p ~ 1
        quality = (tokens.float() * 0.37 + torch.arange(tokens.shape[1]) * 0.1).sin() if need_quality else None
        lo, hi = fresh or (0, tokens.shape[1])
        return PrismOutput(logits=logits, quality=None if quality is None else quality[:, lo:hi],
                           kv_cache=_RowsCache() if fill_cache else None)


class _RowsCache:
    def rows(self, index):
        return self


def _canvas(kinds):
    tokens = torch.full((len(kinds), PROMPT + GEN), MASK)
    tokens[:, 0], tokens[:, 1] = torch.tensor(kinds), 5
    fixed = torch.zeros_like(tokens, dtype=torch.bool)
    fixed[:, :PROMPT] = True
    return tokens, fixed


def _run(kinds, policy="none", k_block=0, steps=8, threshold_steps="ignore", cache="none"):
    tokens, fixed = _canvas(kinds)
    model, record = RowPaced(), SamplingRecord(keep_steps=True)
    settings = SamplerSettings(MASK, steps, BlockwiseSchedule(BLOCK, k_block, gen_length=GEN), policy=policy,
                               unmask_order="confidence", temperature=0.0, threshold=0.5,
                               threshold_steps=threshold_steps, cache=cache)
    out = sample(model, tokens, fixed, settings, generator=torch.Generator().manual_seed(0), record=record)
    return out, model, record


@pytest.mark.parametrize("policy,k_block", [("none", 0), ("prism", 2)])
def test_a_fast_row_finishes_its_blocks_without_waiting_for_a_slow_one(policy, k_block):
    out, model, record = _run([FAST, SLOW], policy, k_block)
    alone = {kind: len(_run([kind], policy, k_block)[2].passes) for kind in (FAST, SLOW)}
    assert alone[FAST] < alone[SLOW]
    assert len(record.passes) == alone[SLOW]  # the batch costs its slowest row, not the sum of per-block maxima
    fast_passes = sum(FAST in p["rows"] for p in model.passes)
    assert fast_passes == alone[FAST]  # then it left the batch: later passes carry the slow row only
    assert [p["rows"] for p in model.passes[fast_passes:]] == [[SLOW]] * (alone[SLOW] - alone[FAST])
    assert (out != MASK).all()
    for kind in (FAST, SLOW):  # each row is what it is alone (argmax; the rows do not interact)
        row = 0 if kind == FAST else 1
        assert torch.equal(out[row], _run([kind], policy, k_block)[0][0])


@pytest.mark.parametrize("threshold_steps", ["ignore", "cap"])
def test_no_block_closes_with_a_mask_in_it_and_every_block_gets_its_round(threshold_steps):
    out, _, record = _run([SLOW, FAST, SLOW, FAST], "prism", 2, steps=12, threshold_steps=threshold_steps)
    rounds = torch.zeros(4, GEN // BLOCK, dtype=torch.long)
    before = _canvas([SLOW, FAST, SLOW, FAST])[0]
    for after, remasked, _ in record.steps:
        rows, pos = remasked.nonzero(as_tuple=True)
        rounds.index_put_((rows, (pos - PROMPT) // BLOCK), torch.ones_like(rows), accumulate=True)
        # A row writes to a later block only once every earlier block of that row is free of masks.
        changed = (after != before)
        for r in range(4):
            cols = changed[r].nonzero().flatten()
            if len(cols):
                first_block = (int(cols.min()) - PROMPT) // BLOCK
                assert (after[r, PROMPT:PROMPT + first_block * BLOCK] != MASK).all()
        before = after
    # One round per block, in its second pass: K_block = 2, or all a slow row has decoded by then (one token).
    assert (rounds[[1, 3]] == 2).all() and (rounds[[0, 2]] == 1).all() and (out != MASK).all()


def test_rows_in_different_blocks_share_one_cached_pass_and_a_new_block_refills():
    _, model, record = _run([FAST, SLOW], cache="dual")
    first = model.passes[0]
    assert first["fill"]  # the first pass of every row's first block fills the cache
    for p, (rows, (lo, hi)) in zip(model.passes, record.passes):
        if p["fill"]:
            assert (lo, hi) == (0, PROMPT + GEN)
        else:  # a cached pass recomputes the span over the rows' blocks: one block, or two when they differ
            assert hi - lo in (BLOCK, 2 * BLOCK, 3 * BLOCK, 4 * BLOCK) and p["fresh"] == (lo, hi)
    assert sum(p["fill"] for p in model.passes) >= GEN // BLOCK  # each row's new block refilled the cache
