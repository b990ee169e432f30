"""The PRISM authors' LLaDA canvas (sampler.canvas): their step plan, re-implemented plainly here from their
description, against what prism-ds's blockwise sampler does on the same canvas.

The authors' llada_inference: every row is `canvas` positions, its prompt then masks; canvas // block_length
blocks, block b of a row spanning [prompt + b * block, min(prompt + (b + 1) * block, canvas)); steps //
n_blocks steps per block; a block that is empty in every row makes no pass; per block, the unmask counts are
its masks spread evenly over the steps (remainder first) plus the step's remask count, the K_block remasks
spread as K // steps on every step and the remainder on the steps nearest the block's middle (ties: the
earlier step); each step remasks min(count, clean tokens of the block) and unmasks min(count, masks of the
block before that remasking).
"""
import pytest
import torch

from prism_ds.core.sampler import SamplerSettings, SamplingRecord, sample
from prism_ds.core.schedules import BlockwiseSchedule
from prism_ds.models.prism_model import PrismOutput

MASK, V = 0, 11


class Scripted(torch.nn.Module):
    """Random logits and a quality that depends on the tokens shown; records each pass's rows."""

    def __init__(self):
        super().__init__()
        self.gen, self.rows = torch.Generator().manual_seed(0), []

    def forward(self, tokens, need_logits=True, need_quality=True, logits_cols=None, **_):
        self.rows.append(len(tokens))
        logits = torch.randn(*tokens.shape, V, generator=self.gen)
        logits = logits if logits_cols is None else logits[:, logits_cols]
        quality = (tokens.float() * 0.37 + torch.arange(tokens.shape[1]) * 0.01).sin() if need_quality else None
        return PrismOutput(logits=logits, quality=quality)


def authors_plan(prompts: list[int], canvas: int, block: int, steps: int, k_block: int):
    """Per pass: each row's (block bounds, unmasked, remasked), and each row's masks left at the end."""
    n_blocks = canvas // block
    per_block = max(1, steps // n_blocks)
    middle = (per_block - 1) / 2
    nearest = sorted(range(per_block), key=lambda i: abs(i - middle))  # a stable sort: ties keep the earlier step
    remask = [k_block // per_block + (nearest.index(i) < k_block % per_block) for i in range(per_block)]
    passes, left = [], [0] * len(prompts)
    for b in range(n_blocks):
        bounds = [(p + b * block, min(p + (b + 1) * block, canvas)) for p in prompts]
        size = [max(0, hi - lo) for lo, hi in bounds]
        masks = list(size)
        if sum(masks) == 0:
            continue
        base = [[n // per_block + (i < n % per_block) for i in range(per_block)] for n in masks]
        for i in range(per_block):
            if sum(masks) == 0:  # their loop passes first, then notices the block is full
                passes.append([(bounds[j], 0, 0) for j in range(len(prompts))])
                break
            step = []
            for j in range(len(prompts)):
                before = masks[j]
                re = min(remask[i], size[j] - before)
                un = min(base[j][i] + remask[i], before)
                masks[j] = before - un + re
                step.append((bounds[j], un, re))
            passes.append(step)
        left = [a + m for a, m in zip(left, masks)]
    return passes, left


def ours(prompts: list[int], canvas: int, block: int, steps: int, k_block: int, policy: str = "prism"):
    """prism-ds on the same canvas: the history of every pass, the filled canvas and the model's pass sizes."""
    tokens = torch.full((len(prompts), canvas), MASK)
    fixed = torch.zeros_like(tokens, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, :p] = torch.randint(1, V, (p,), generator=torch.Generator().manual_seed(i))
        fixed[i, :p] = True
    record, model = SamplingRecord(keep_steps=True), Scripted()
    settings = SamplerSettings(MASK, steps, BlockwiseSchedule(block, k_block, canvas=canvas), policy=policy,
                               unmask_order="confidence", temperature=0.0)
    out = sample(model, tokens, fixed, settings, generator=torch.Generator().manual_seed(0), record=record)
    return tokens, record.steps, out, model


SETTINGS = [  # (prompt lengths, canvas, block, N, K_block): every row's last block holds >= its steps masks
    ([8, 16, 24], 64, 8, 32, 2),
    ([16, 24, 40], 64, 8, 64, 6),
    ([16, 24, 40], 128, 16, 64, 4),
    ([100, 140, 150], 1024, 32, 256, 4),  # the paper's MBPP regime: 8 steps per block of 32
    ([100, 140, 150], 1024, 32, 256, 6),
    ([40, 64], 96, 32, 48, 8),
    ([9, 33], 64, 16, 16, 0),  # no remasks: any last block
]


@pytest.mark.parametrize("prompts,canvas,block,steps,k_block", SETTINGS)
def test_the_canvas_runs_the_authors_step_plan(prompts, canvas, block, steps, k_block):
    theirs, left = authors_plan(prompts, canvas, block, steps, k_block)
    start, history, out, model = ours(prompts, canvas, block, steps, k_block)
    assert len(history) == len(theirs) == len(model.rows)  # the same passes (empty blocks make none)
    before = start
    for n, ((after, remasked, unmasked), plan) in enumerate(zip(history, theirs)):
        for row, ((lo, hi), un, re) in enumerate(plan):
            assert (int(unmasked[row].sum()), int(remasked[row].sum())) == (un, re), (n, row)
            changed = (before[row] != after[row]).nonzero().flatten()
            assert changed.numel() == 0 or (lo <= changed.min() and changed.max() < hi), (n, row)  # only its block
        before = after
    assert left == [0] * len(prompts) and (out != MASK).all()
    assert all(torch.equal(out[i, :p], start[i, :p]) for i, p in enumerate(prompts))  # prompts never change


def test_finished_rows_leave_the_batch():
    prompts = [8, 40]  # the second row's canvas ends four blocks earlier
    _, _, _, model = ours(prompts, 64, 8, 32, 2)
    assert model.rows == [2] * 12 + [1] * 16  # 7 blocks for the first row, 3 for the second, 4 steps each


def test_where_the_authors_plan_differs_prism_ds_still_fills_every_block():
    # K_block = steps per block: their centred spread puts a remask on a block's first and last step; the last
    # one is never refilled. And a short last block (3 masks over 4 steps) with remasks can end with a mask.
    for k_block, prompts in ((4, [8, 16]), (2, [5, 13])):
        _, left = authors_plan(prompts, 64, 8, 32, k_block)
        assert sum(left) > 0  # masks left in their output
        _, history, out, _ = ours(prompts, 64, 8, 32, k_block)
        assert (out != MASK).all()
        # prism-ds keeps a block's first and last step free of remasks (remask_steps: inner steps only).
        assert all(not remasked.any() for n, (_, remasked, _) in enumerate(history) if n % 4 in (0, 3))


def test_canvas_settings_are_named():
    with pytest.raises(ValueError, match="exactly one of sampler.gen_length and sampler.canvas"):
        BlockwiseSchedule(8, 2, gen_length=64, canvas=64)
    with pytest.raises(ValueError, match="block_length=24 must divide sampler.canvas=64"):
        BlockwiseSchedule(24, canvas=64)
    with pytest.raises(ValueError, match=r"multiple of the number of blocks \(canvas / block_length = 64 / 8 = 8\)"):
        ours([8], 64, 8, 12, 2)


def test_stop_at_eos_on_the_canvas_stops_each_row_after_its_own_block():
    eos, prompts, canvas, block = 7, [8, 21], 64, 8

    class EosBiased(Scripted):
        def forward(self, tokens, **kw):
            out = super().forward(tokens, **kw)
            out.logits[..., eos] += 2.0
            return out

    tokens = torch.full((2, canvas), MASK)
    fixed = torch.zeros_like(tokens, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, :p], fixed[i, :p] = 1, True
    model = EosBiased()
    settings = SamplerSettings(MASK, 32, BlockwiseSchedule(block, 2, canvas=canvas), policy="prism",
                               unmask_order="confidence", temperature=0.0, eos_id=eos, stop_at_eos=True)
    out = sample(model, tokens, fixed, settings, generator=torch.Generator().manual_seed(0))
    assert (out != MASK).all() and (out[:, :8] == 1).all()
    for row, p in zip(out, prompts):
        first = int((row[p:] == eos).nonzero()[0]) + p
        block_end = p + ((first - p) // block + 1) * block  # the row's own block boundaries
        assert (row[block_end:] == eos).all()
    assert sum(model.rows) < 2 * 32  # stopped rows left the batch


def test_threshold_decoding_on_the_canvas_gives_each_block_one_remask_round():
    """Rows of different prompt lengths leave the batch at different times; the block a step works on, not the
    columns the remaining rows span, says when a new block (and its K_block round) starts."""
    prompts, canvas, block, k_block = [1, 6, 11], 32, 4, 2
    tokens = torch.full((3, canvas), MASK)
    fixed = torch.zeros_like(tokens, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, :p], fixed[i, :p] = 1, True
    record = SamplingRecord(keep_steps=True)
    settings = SamplerSettings(MASK, 8, BlockwiseSchedule(block, k_block, canvas=canvas), policy="prism",
                               unmask_order="confidence", temperature=0.0, threshold=0.999, threshold_steps="ignore")
    out = sample(Scripted(), tokens, fixed, settings, generator=torch.Generator().manual_seed(0), record=record)
    assert (out != MASK).all()
    for row, p in enumerate(prompts):
        rounds: dict[int, int] = {}
        for _, remasked, _ in record.steps:
            hit = remasked[row].nonzero().flatten()
            if len(hit):
                b = int(hit[0] - p) // block
                assert ((hit - p) // block == b).all()  # one block at a time
                rounds[b] = rounds.get(b, 0) + 1
        assert rounds and all(n == 1 for n in rounds.values()), (row, rounds)
