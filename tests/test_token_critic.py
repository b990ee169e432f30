"""The Token-Critic baseline: its loss, the critic stage, the token-critic policy and how evaluation loads it."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import read_scalars, tiny_overrides
from prism_ds.config import ConfigError, load_config
from prism_ds.core.loss import token_critic_loss
from prism_ds.core.masking import mask_tokens
from prism_ds.core.objective import critic_losses
from prism_ds.core.sampler import SamplerSettings, SamplingRecord, sample
from prism_ds.core.schedules import EvenSchedule
from prism_ds.models.critic import CriticScored, build_critic, load_critic
from prism_ds.models.loading import load_model
from prism_ds.models.prism_model import PrismModel, PrismOutput
from prism_ds.models.weights import read_meta
from prism_ds.sudoku.board import MASK_ID
from prism_ds.sudoku.data import board_spec, eval_puzzles, train_boards
from prism_ds.sudoku.evaluate import evaluate_checkpoint, results_key, solve

MASK, V, L = 0, 5, 12


def _critic_cfg(run_dir, fine, **extra):
    """A tiny run whose critic stage trains against the session's finetune export."""
    return load_config("sudoku_cpu", tiny_overrides(run_dir, **{
        "critic.steps": 40, "critic.micro_batch_size": 32, "critic.log_every": 10, "critic.calib_every": 20,
        "critic.lr": "1e-3", "critic.warmup_steps": 5, "critic.init_from": str(fine), **extra}))


@pytest.fixture(scope="module")
def critic_run(tiny_run, tmp_path_factory):
    """(config, finetune export, critic export) of a tiny critic trained against the session's fine-tune."""
    from prism_ds.engine.trainer import train

    _, _, fine = tiny_run
    cfg = _critic_cfg(tmp_path_factory.mktemp("critic_run"), fine)
    return cfg, fine, train(cfg, "critic", progress=False)


def test_token_critic_loss_is_the_authors_weighted_bce():
    q = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]])
    label = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    masked = torch.tensor([[True, True, False], [False, True, True]])
    t = torch.tensor([0.5, 0.25])
    bce = lambda q, y: math.log(1 + math.exp(q)) - q * y  # noqa: E731  BCE with logits
    row0 = (bce(0.0, 1) + bce(1.0, 0)) / 0.5 / 3  # masked positions only, weighted 1/t, over 3 maskable positions
    row1 = (bce(0.0, 1) + bce(0.0, 0)) / 0.25 / 3
    assert token_critic_loss(q, label, masked, t, 3.0).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


class _OneHotFTheta(torch.nn.Module):
    """f_theta that puts all its mass on a fixed token per position: x̂ is known in advance."""

    def __init__(self, table):
        super().__init__()
        self.table = table  # [L] token each position is filled with

    def forward(self, tokens, need_logits=True, need_quality=False, **_):
        logits = torch.full((*tokens.shape, V), -1e4)
        logits.scatter_(-1, self.table.expand(tokens.shape)[..., None], 0.0)
        return PrismOutput(logits=logits)


class _TableCritic(torch.nn.Module):
    """quality = table[position, token of x̂]; records every x̂ it scores (and into a shared event log)."""

    def __init__(self, table, log=None):
        super().__init__()
        self.table, self.seen, self.log = table, [], log

    def forward(self, tokens, need_logits=False, need_quality=True, **_):
        self.seen.append(tokens.clone())
        if self.log is not None:
            self.log.append(("critic", tokens.clone()))
        pos = torch.arange(tokens.shape[1]).expand(tokens.shape)
        return PrismOutput(quality=self.table[pos, tokens])


def test_critic_step_fills_every_mask_from_f_theta_and_scores_the_masked_positions_only():
    x = torch.tensor([[1, 2, 3, 4, 1, 2], [4, 3, 2, 1, 4, 3]])
    fixed = torch.zeros_like(x, dtype=torch.bool)
    fixed[:, 0] = True
    fill = torch.tensor([1, 2, 4, 4, 1, 1])  # x̂ is right at some positions, wrong at others
    table = torch.randn(6, V, generator=torch.Generator().manual_seed(0))
    masking = load_config().masking
    prism = load_config().prism
    out = critic_losses(_TableCritic(table), _OneHotFTheta(fill), x, fixed, MASK, masking, prism, lengths=5.0,
                        generator=torch.Generator().manual_seed(3), allowed_tokens=torch.tensor([0, 1, 1, 1, 1]) > 0)
    batch = mask_tokens(x, fixed, MASK, eps=masking.eps, antithetic=masking.antithetic,
                        generator=torch.Generator().manual_seed(3))  # the same masks and t
    assert batch.masked.any() and (~batch.masked & ~fixed).any()
    total = 0.0
    for b in range(2):
        row = 0.0
        for i in range(6):
            if batch.masked[b, i]:
                y = float(fill[i] == x[b, i])
                q = float(table[i, fill[i]])
                row += (math.log(1 + math.exp(q)) - q * y) / float(batch.t[b])
        total += row / 5.0
    assert out.total.item() == pytest.approx(total / 2, rel=1e-5)
    assert torch.equal(out.label, (fill.expand(2, 6) == x).float()[batch.masked])


def test_critic_stage_trains_the_critic_and_leaves_f_theta_alone(critic_run):
    cfg, fine, critic_dir = critic_run
    meta = read_meta(critic_dir)
    assert meta["stage"] == "critic" and meta["step"] == 40
    assert not (critic_dir.parent.parent / "finetune").exists()  # f_theta came from critic.init_from
    scalars = read_scalars(critic_dir.parent / "tb")
    for tag in ("loss/critic", "loss/mdm", "quality/auroc", "calibration/auroc", "calibration/bce"):
        assert tag in scalars, tag
    # f_theta's bytes are untouched, and the critic is a model of its own.
    before = load_file(str(fine / "backbone.safetensors"))
    f_theta, _ = load_model(fine)
    assert all(torch.equal(before[k], v) for k, v in f_theta.backbone.state_dict().items())
    critic = load_critic(critic_dir)
    assert not torch.equal(critic.backbone.vocab_embed.embedding, f_theta.backbone.vocab_embed.embedding)
    # The critic's held-out loss fell below the untrained (zero-head) critic's log 2 level.
    boards = train_boards(cfg, progress=False)[-64:]
    fixed = board_spec(cfg).separator_mask()[None].expand(len(boards), -1)
    frozen = PrismModel(f_theta.backbone).eval()

    def loss(model):
        with torch.no_grad():
            return critic_losses(model, frozen, boards, fixed, MASK_ID,
                                 cfg.masking, cfg.prism, lengths=float((~fixed[0]).sum()),
                                 generator=torch.Generator().manual_seed(1),
                                 allowed_tokens=board_spec(cfg).digit_tokens()).total.item()

    torch.manual_seed(0)
    untrained = build_critic(cfg.model, board_spec(cfg).vocab_size, MASK_ID).eval()
    assert loss(critic) < 0.95 * loss(untrained)


def test_a_finished_critic_is_reused_and_a_changed_f_theta_invalidates_it(tiny_run, tmp_path, capsys):
    from prism_ds.engine.trainer import train

    _, _, fine = tiny_run
    shutil.copytree(fine, tmp_path / "finetune" / "final")  # the default f_theta: <run_dir>/finetune/final
    cfg = _critic_cfg(tmp_path, fine, **{"critic.init_from": "''", "critic.steps": 4, "critic.ckpt_every": 2})
    done = train(cfg, "critic", progress=False)
    assert read_meta(done)["f_theta"] == str((tmp_path / "finetune" / "final").resolve())
    shutil.rmtree(done)  # an interrupted stage: it resumes from its last checkpoint, with more steps
    cfg.critic.steps = 6
    train(cfg, "critic", progress=False)
    assert "critic: resumed from" in capsys.readouterr().out and read_meta(done)["step"] == 6
    train(cfg, "critic", progress=False)
    assert "already finished with this config" in capsys.readouterr().out
    weights = load_file(str(tmp_path / "finetune" / "final" / "backbone.safetensors"))
    weights["vocab_embed.embedding"] += 0.01  # the finetune stage was trained again: another f_theta
    save_file(weights, str(tmp_path / "finetune" / "final" / "backbone.safetensors"))
    with pytest.raises(ConfigError, match=r"the weights it started from \(finetune/final\) have changed"):
        train(cfg, "critic", progress=False)


def test_critic_stage_refusals_are_named(tmp_path):
    from prism_ds.engine.trainer import train

    with pytest.raises(ConfigError, match=r"critic.steps=0: this run has no critic stage"):
        train(load_config("sudoku_cpu", tiny_overrides(tmp_path)), "critic", progress=False)
    with pytest.raises(ConfigError, match=r"not an export: train it first \(`prism-ds train --stage finetune`\)"):
        train(load_config("sudoku_cpu", tiny_overrides(tmp_path, **{"critic.steps": 3})), "critic", progress=False)


def _policy_run(seed=0, batch=32, steps=5, k=2):
    """token-critic over scripted models; returns (event log, history, fixed)."""
    log = []

    class FTheta(torch.nn.Module):
        def forward(self, tokens, need_logits=True, need_quality=False):
            log.append(("f", tokens.clone()))
            logits = torch.randn(L, V, generator=torch.Generator().manual_seed(9))
            return PrismOutput(logits=logits.expand(*tokens.shape, V).clone())

    table = torch.randn(L, V, generator=torch.Generator().manual_seed(4))
    tokens = torch.zeros(batch, L, dtype=torch.long)
    fixed = torch.zeros(batch, L, dtype=torch.bool)
    fixed[:, :3], tokens[:, :3] = True, torch.tensor([1, 2, 3])
    allowed = torch.tensor([False, True, True, True, False])  # token 4 is never drawn (as a Sudoku separator)
    model = CriticScored(FTheta(), _TableCritic(table, log), MASK, allowed, seed=seed)
    record = SamplingRecord(keep_steps=True)
    sample(model, tokens, fixed, SamplerSettings(MASK, steps, EvenSchedule(remask_count="fixed", remask_k=k),
                                                 policy="token-critic"),
           generator=torch.Generator().manual_seed(seed), record=record)
    return log, record.steps, fixed, table, allowed


def test_token_critic_remasks_exactly_the_k_lowest_critic_scores_of_x_hat_among_clean_cells():
    log, history, fixed, table, allowed = _policy_run()
    steps = [i for i, (kind, _) in enumerate(log) if kind == "f"]
    assert len(steps) == len(history)  # one f_theta pass per step, plus one critic pass where it may remask
    scored = 0
    for step, i in enumerate(steps):
        before = log[i][1]
        remasked = history[step][1]
        if i + 1 < len(log) and log[i + 1][0] == "critic":
            x_hat = log[i + 1][1]
            clean = (before != MASK) & ~fixed
            masks = before == MASK
            assert torch.equal(x_hat[~masks], before[~masks]) and (x_hat != MASK).all()
            assert allowed[x_hat[masks]].all()
            score = table[torch.arange(L).expand(before.shape), x_hat]
            for b in range(len(before)):
                k = int(remasked[b].sum())
                lowest = score[b].masked_fill(~clean[b], float("inf")).argsort()[:k]
                assert set(remasked[b].nonzero().flatten().tolist()) == set(lowest.tolist())
                assert not (remasked[b] & ~clean[b]).any()
            scored += int(remasked.sum(1).eq(2).sum())
        else:
            assert not remasked.any()
    assert scored > 0  # K = 2 remasks happened


def test_x_hat_is_drawn_from_the_wrappers_own_seeded_generator():
    log_a, hist_a, *_ = _policy_run(seed=0)
    log_b, hist_b, *_ = _policy_run(seed=0)
    log_c, _, *_ = _policy_run(seed=1)
    critic_a = [t for kind, t in log_a if kind == "critic"]
    assert all(torch.equal(a, b) for a, b in zip(critic_a, [t for kind, t in log_b if kind == "critic"]))
    assert torch.equal(hist_a[-1][0], hist_b[-1][0])
    assert not all(torch.equal(a, c) for a, c in zip(critic_a, [t for kind, t in log_c if kind == "critic"]))


def _loaded(critic_run):
    """(cfg, f_theta, critic, board spec, evaluation puzzles) of the shared tiny critic run."""
    cfg, fine, critic_dir = critic_run
    return cfg, load_model(fine)[0], load_critic(critic_dir), board_spec(cfg), eval_puzzles(cfg, progress=False)[0]


def test_wrapper_gives_f_thetas_logits_and_the_critics_scores_of_x_hat(critic_run):
    cfg, f_theta, critic, spec, puzzles = _loaded(critic_run)
    wrapped = CriticScored(f_theta, critic, MASK_ID, spec.digit_tokens(), seed=3)
    with torch.no_grad():
        out = wrapped(puzzles)
        ref = f_theta(puzzles, need_quality=False).logits
        gen = torch.Generator().manual_seed(3 + 7_777_777)
        from prism_ds.core.sampler import fill_masks

        x_hat = fill_masks(ref, puzzles, puzzles == MASK_ID, MASK_ID, spec.digit_tokens(), generator=gen)
        assert torch.equal(out.logits, ref)
        assert torch.equal(out.quality, critic(x_hat, need_logits=False).quality)
        assert spec.digit_tokens()[x_hat[puzzles == MASK_ID]].all()


def test_missing_critic_is_a_clear_error_naming_the_setting_and_the_command(tiny_run, tmp_path):
    cfg, _, fine = tiny_run
    f_theta, _ = load_model(fine)
    spec = board_spec(cfg)
    puzzles, _ = eval_puzzles(cfg, progress=False)
    with pytest.raises(ValueError, match=r"token-critic' needs a critic: .*--stage critic.*sampler.critic"):
        solve(f_theta, spec, puzzles, 4, "token-critic", cfg.sampler)
    with pytest.raises(ValueError, match="needs a critic"):  # PRISM's head never stands in for the critic
        sample(f_theta, puzzles, puzzles != MASK_ID, SamplerSettings(MASK_ID, 4, EvenSchedule(remask_k=2),
                                                                     policy="token-critic"))
    missing = load_config("sudoku_cpu", tiny_overrides(cfg.run_dir, **{
        "sampler.policies": "[none,token-critic]", "sampler.critic": str(tmp_path / "nowhere")}))
    with pytest.raises(FileNotFoundError, match=r"sampler.critic: no critic export at .*nowhere.*"
                                                r"`prism-ds train --stage critic critic.steps=N`"):
        evaluate_checkpoint(fine, missing, progress=False)


def test_evaluation_loads_the_critic_and_keys_the_cache_on_its_weights(critic_run, tmp_path):
    cfg, fine, critic_dir = critic_run
    cfg = load_config("sudoku_cpu", tiny_overrides(cfg.run_dir, **{
        "sampler.policies": "[none,token-critic]", "sampler.steps": "[4]", "critic.init_from": str(fine)}))
    table = evaluate_checkpoint(fine, cfg, progress=False)  # <run_dir>/critic/final by default
    assert "| token-critic |" in table and f"score with the critic {critic_dir}" in table
    _, path = eval_puzzles(cfg, progress=False)
    plain = results_key(fine, path, cfg.sampler)
    with_critic = results_key(fine, path, cfg.sampler, critic_dir)
    copy = tmp_path / "critic"
    shutil.copytree(critic_dir, copy)
    head = load_file(str(copy / "quality_head.safetensors"))
    head["final.linear.bias"] += 1.0
    save_file(head, str(copy / "quality_head.safetensors"))
    assert len({plain, with_critic, results_key(fine, path, cfg.sampler, copy)}) == 3
    cfg.sampler.critic = str(copy)  # the path itself is not in the key, only the critic's content
    assert results_key(fine, path, cfg.sampler) == plain
    # The table keys on the checkpoint and records the critic per token-critic cell: another critic recomputes
    # only those cells.
    results = fine.parent / "eval" / f"results_{plain}.jsonl"
    before = results.read_text().splitlines()
    evaluate_checkpoint(fine, cfg, progress=False)
    after = results.read_text().splitlines()
    new_cells = [json.loads(r)["policy"] for r in after[len(before):]]
    assert after[:len(before)] == before and new_cells == ["token-critic"] * cfg.sampler.n_seeds


def test_other_policies_ignore_the_critic(critic_run):
    cfg, f_theta, critic, spec, puzzles = _loaded(critic_run)
    for row in ("none", "prism", "remdm", "remdm-conf", "remdm:binomial/ancestral", "prism/loop"):
        assert torch.equal(solve(f_theta, spec, puzzles, 4, row, cfg.sampler, seed=2),
                           solve(f_theta, spec, puzzles, 4, row, cfg.sampler, seed=2, critic=critic)), row
