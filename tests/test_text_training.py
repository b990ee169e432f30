"""Prompt/solution training end to end: task=text through the real engine with a locally built tokenizer."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prism_ds.core.objective as objective
import prism_ds.engine.trainer as trainer
from helpers import REPO, build_tokenizer, free_port, read_scalars, sample_rows, subprocess_env, tiny_overrides, write_jsonl
from prism_ds.config import load_config
from prism_ds.models.loading import load_model
from prism_ds.models.weights import read_meta

MAX_LEN = 22  # the longest fixture rows (25 tokens) are truncated


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """(cfg, pretrain export, finetune export, recorded batches, recorded masks) of a tiny text run."""
    root = tmp_path_factory.mktemp("text_run")
    tok = build_tokenizer(root / "tok")
    train_file = write_jsonl(root / "train.jsonl", sample_rows(200))
    held_file = write_jsonl(root / "held.jsonl", sample_rows(40, start=1000))
    cfg = load_config("sudoku_cpu", tiny_overrides(
        root / "run", task="text", **{"text.source": train_file, "text.tokenizer": tok, "text.max_length": MAX_LEN,
                                      "text.heldout_source": held_file, "pretrain.steps": 40, "finetune.steps": 6,
                                      "pretrain.micro_batch_size": 8, "finetune.micro_batch_size": 8,
                                      "finetune.calib_every": 3, "pretrain.log_every": 10, "finetune.log_every": 3}))
    batches, masks = [], []
    real_losses, real_mask = trainer.compute_losses, objective.mask_tokens

    def spy_losses(model, x, fixed, *args, **kwargs):
        batches.append((x.clone(), fixed.clone(), kwargs["lengths"].clone()))
        return real_losses(model, x, fixed, *args, **kwargs)

    def spy_mask(x, fixed, *args, **kwargs):
        out = real_mask(x, fixed, *args, **kwargs)
        masks.append((fixed.clone(), out.masked.clone()))
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(trainer, "compute_losses", spy_losses)
    mp.setattr(objective, "mask_tokens", spy_mask)
    try:
        pre = trainer.train(cfg, "pretrain", progress=False)
        fine = trainer.train(cfg, "finetune", progress=False)
    finally:
        mp.undo()
    return cfg, pre, fine, batches, masks


def _prompt_len(tok, row) -> int:
    return 1 + len(tok(row["prompt"], add_special_tokens=False)["input_ids"])  # BOS + prompt


def test_training_reads_the_rows_in_order_with_prompts_fixed(text_run):
    from transformers import AutoTokenizer

    cfg, _, _, batches, _ = text_run
    tok = AutoTokenizer.from_pretrained(cfg.text.tokenizer)
    rows = sample_rows(200)
    x, fixed, lengths = batches[0]  # the first pretraining micro-batch: rows 0..7 in file order
    assert x.shape == (8, MAX_LEN)
    for i in range(8):
        p = _prompt_len(tok, rows[i])
        assert fixed[i, :p].all() and not fixed[i, p:].any(), i
        assert lengths[i].item() == MAX_LEN - p  # SFT normaliser: answer + EOS + EOS pads
        ids = tok(rows[i]["solution"], add_special_tokens=False)["input_ids"]
        assert x[i, p:p + len(ids)].tolist() == ids[:MAX_LEN - p]


def test_prompt_tokens_are_never_masked(text_run):
    *_, masks = text_run
    assert len(masks) >= 40 + 6 + 2  # every training step (plus held-out calibration passes)
    for fixed, masked in masks:
        assert fixed.any() and masked.any()
        assert not (fixed & masked).any()


def test_text_run_logs_padding_truncation_and_calibration(text_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, pre, fine, _, _ = text_run
    scalars = {}
    for stage_dir in (pre.parent, fine.parent):
        acc = EventAccumulator(str(stage_dir / "tb"), size_guidance={"images": 0})
        acc.Reload()
        scalars[stage_dir.name] = {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
        if stage_dir.name == "finetune":
            assert len(acc.Images("calibration/reliability")) == 2  # steps 3 and 6
    pad = scalars["pretrain"]["data/padding_fraction"] + scalars["finetune"]["data/padding_fraction"]
    assert all(0.1 < v < 0.3 for v in pad)  # EOS pads up to max_length (~17% of these rows' tokens)
    truncated = scalars["pretrain"]["data/truncated"]
    assert truncated[-1] > 0 and truncated == sorted(truncated)  # cumulative count of over-long rows
    assert scalars["pretrain"]["data/dropped"][-1] == 0
    fine_tags = scalars["finetune"]
    for tag in ("loss/prism", "loss/mdm", "calibration/ece", "calibration/auroc", "quality/auroc"):
        assert tag in fine_tags and all(torch.isfinite(torch.tensor(fine_tags[tag]))), tag


def test_text_export_reloads_without_deepspeed(text_run):
    from transformers import AutoTokenizer

    cfg, pre, fine, _, _ = text_run
    model, loaded_cfg = load_model(fine)
    assert loaded_cfg.task == "text" and loaded_cfg.text.max_length == MAX_LEN
    vocab = len(AutoTokenizer.from_pretrained(cfg.text.tokenizer))
    assert read_meta(fine)["vocab_size"] == read_meta(pre)["vocab_size"] >= vocab
    x = torch.randint(0, vocab, (2, MAX_LEN))
    out = model(x, need_logits=True, need_quality=True)
    assert out.logits.shape == (2, MAX_LEN, read_meta(fine)["vocab_size"]) and out.quality.shape == (2, MAX_LEN)


def test_two_rank_zero3_text_run_shards_the_rows_and_sums_the_counts(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    train_file = write_jsonl(tmp_path / "train.jsonl", sample_rows(96))
    launcher = Path(sys.executable).parent / "deepspeed"
    overrides = tiny_overrides(tmp_path / "run", task="text", **{
        "text.source": train_file, "text.tokenizer": tok, "text.max_length": MAX_LEN, "pretrain.steps": 6,
        "pretrain.micro_batch_size": 8, "pretrain.log_every": 6, "pretrain.ds_config": "zero3.json"})
    proc = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                           "prism_ds.cli", "train", "--stage", "pretrain", "--no-progress", *overrides],
                          env=subprocess_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("[prism-ds] pretrain finished") == 1  # rank 0 reports; exit status 0 covers both
    # 6 steps x 8 rows x 2 ranks = all 96 rows once: each rank read its own half, so every over-long row
    # of the file was truncated exactly once across the ranks.
    lengths = [1 + len(r["prompt"].split()) + len(r["solution"].split()) + 1 for r in sample_rows(96)]
    assert read_scalars(tmp_path / "run" / "pretrain" / "tb")["data/truncated"] == [sum(n > MAX_LEN for n in lengths)]
    model, _ = load_model(tmp_path / "run" / "pretrain" / "final")
    assert model.quality_head is None
