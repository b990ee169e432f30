"""The OpenWebText path end to end on CPU: a tiny MDLM-format folder fine-tuned by 2 ZeRO-2 ranks with the
attention+linear head on packed documents, and the text demo / Table 2 command on a tiny run (then resumed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import REPO, free_port, read_scalars, subprocess_env
from prism_ds.models.dit import DiT
from prism_ds.models.loading import load_model
from prism_ds.models.weights import read_meta

WORDS = ("the model masks tokens and learns to fill them while a quality head learns which filled tokens are "
         "right so that sampling can remask the wrong ones and draw them again").split()


def _docs(path: Path, n: int, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        idx = torch.randint(0, len(WORDS), (int(torch.randint(8, 30, (1,), generator=g)),), generator=g)
        rows.append({"text": " ".join(WORDS[i] for i in idx)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tiny_mdlm(folder: Path, vocab: int) -> Path:
    """A random MDLM folder in the published layout (config.json + model.safetensors under backbone.)."""
    torch.manual_seed(0)
    model = DiT(vocab, 32, 1, 2, 16, dropout=0.0)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "mdlm", "vocab_size": vocab, "model_length": 32, "hidden_dim": 32, "cond_dim": 16,
        "n_blocks": 1, "n_heads": 2, "dropout": 0.1, "time_conditioning": False}))
    save_file({f"backbone.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from prism_ds.textgen.corpus import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("owt")
    docs = _docs(root / "docs.jsonl", 300)
    tok = train_bpe_tokenizer([docs], root / "tok", vocab_size=300)
    return root, docs, tok


def test_two_rank_zero2_finetune_of_an_mdlm_folder_with_the_attention_head(corpus, tmp_path):
    root, docs, tok = corpus
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tok)))
    folder = _tiny_mdlm(tmp_path / "mdlm", vocab)
    overrides = [f"run_dir={tmp_path / 'run'}", "task=packed_text", "model.kind=mdlm", f"model.path={folder}",
                 "quality_head.kind=attention+linear", f"text.source={docs}", f"text.tokenizer={tok}",
                 "text.max_length=32", "text.heldout_docs=20", "prism.k=4", "prism.n_y=2", "prism.nucleus_p=0.9",
                 "prism.lam=0.5", "finetune.steps=4", "finetune.micro_batch_size=4", "finetune.log_every=2",
                 "finetune.calib_every=2", "finetune.ds_config=zero2.json"]
    launcher = Path(sys.executable).parent / "deepspeed"
    proc = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                           "prism_ds.cli", "train", "--stage", "finetune", "--recipe", "text_cpu", "--no-progress",
                           *overrides], env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = tmp_path / "run" / "finetune" / "final"
    meta = read_meta(final)
    assert meta["mask_id"] == vocab - 1 and meta["vocab_size"] == vocab
    scalars = read_scalars(tmp_path / "run" / "finetune" / "tb")
    assert len(scalars["loss/prism"]) == 2 and "quality/auroc" in " ".join(scalars)
    model, cfg = load_model(final)
    assert cfg.model.kind == "mdlm" and type(model.quality_head).__name__ == "AttentionLinearHead"
    base, _ = load_model(folder)
    trained = dict(model.backbone.named_parameters())
    changed = [n for n, p in base.backbone.named_parameters() if not torch.equal(p, trained[n])]
    assert changed  # the paper's setting trains the backbone too
    x = torch.randint(0, vocab - 1, (2, 32))
    out = model(x)
    assert out.logits.shape == (2, 32, vocab) and out.quality.shape == (2, 32)
    folder.rename(tmp_path / "moved")  # the export holds the trained backbone and its sizes: no MDLM folder needed
    again, _ = load_model(final)
    assert torch.equal(again(x).logits, out.logits)


def test_mdlm_run_with_a_mismatched_tokenizer_names_both(corpus, tmp_path):
    from prism_ds.config import load_config
    from prism_ds.engine.data_source import build_task

    root, docs, tok = corpus
    folder = _tiny_mdlm(tmp_path / "mdlm", 1000)
    cfg = load_config("text_cpu", ["model.kind=mdlm", f"model.path={folder}", f"text.source={docs}",
                                   f"text.tokenizer={tok}"])
    with pytest.raises(ValueError, match="tokenizer and checkpoint do not match"):
        build_task(cfg, 4, 0, 1, progress=False)


def test_text_demo_end_to_end_then_resumed_from_its_files(corpus, tmp_path, monkeypatch):
    """The text_cpu pipeline on a tiny budget; a second run reuses every stage and cell and gives the same table."""
    import prism_ds.textgen.corpus as corpus_mod
    from prism_ds.config import load_config
    from prism_ds.textgen import generate
    from prism_ds.textgen.demo import run_text_demo

    root, docs, _ = corpus
    data = tmp_path / "run" / "data"

    def small_corpus(out_dir, heldout_fraction=0.05, **kw):  # the real stdlib corpus takes too long to train on
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "train.jsonl").write_text(docs.read_text())
        return Path(out_dir) / "train.jsonl", Path(out_dir) / "heldout.jsonl"

    monkeypatch.setattr(corpus_mod, "write_stdlib_corpus", small_corpus)
    run = tmp_path / "run"
    cfg = load_config("text_cpu", [
        f"run_dir={run}", f"text.source={data / 'train.jsonl'}", f"text.tokenizer={run / 'tok'}",
        f"text_eval.scorer={run / 'scorer'}", f"text_eval.featurizer={run / 'scorer'}", "text.max_length=32",
        "text.heldout_docs=30", "model.hidden=32", "model.n_blocks=1", "model.n_heads=2", "model.cond_dim=16",
        "pretrain.steps=6", "pretrain.micro_batch_size=8", "finetune.steps=4", "finetune.micro_batch_size=8",
        "finetune.calib_every=2", "text_eval.scorer_steps=5", "text_eval.n_samples=6", "text_eval.batch_size=4",
        "text_eval.mauve_references=30", "sampler.steps=[8,16]",
        "sampler.policies=[none,'prism:binomial','prism:binomial/loop','remdm/remdm-loop']"])
    calls = []
    real = generate.generate_batch
    monkeypatch.setattr(generate, "generate_batch", lambda *a, **k: calls.append(a[4:6]) or real(*a, **k))
    table = run_text_demo(cfg, progress=False)
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0] == "| policy | N = 8 | N = 16 |"
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| data", "| none", "| prism:binomial", "| prism:binomial/loop", "| remdm/remdm-loop"]
    assert len(calls) == 4 * 2 * 2  # rows x N x batches (6 samples in batches of 4)
    samples = run / "text_eval" / "samples" / "prism_binomial_loop_N16.jsonl"
    header, *records = samples.read_text().splitlines()
    assert json.loads(header)["settings"]["policy"] == "prism:binomial/loop" and len(records) == 6
    assert all(len(json.loads(r)["tokens"]) == 32 for r in records)
    assert (run / "text_eval" / "tb").exists() and (run / "results.md").exists()
    calls.clear()
    assert run_text_demo(cfg, progress=False) == table  # everything reused: no sampling, same numbers
    assert calls == []


def test_d2_eta_and_l_on_apply_to_prism_rows_only():
    from prism_ds.config import load_config
    from prism_ds.core.schedules import EvenSchedule, even_family_schedule
    from prism_ds.textgen.generate import row_sampler

    s = load_config("owt_gpu").sampler
    prism = even_family_schedule("even", "binomial", row_sampler(s, "prism"), 128)
    cap = even_family_schedule("even", "binomial", row_sampler(s, "remdm"), 128)
    assert isinstance(prism, EvenSchedule) and (prism.eta, prism.start_step) == (2.56 / 128, 64)
    assert (cap.eta, cap.start_step) == (s.eta, 0)
