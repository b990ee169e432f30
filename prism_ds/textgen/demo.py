"""The CPU text recipe end to end (`prism-ds demo --recipe text_cpu`): the OWT experiment scaled down to 2 cores.

1. a corpus every machine has: the Python standard library's docstrings (textgen/corpus.py), and a byte-level
   BPE trained on it (mask token last, as MDLM's GPT-2 vocabulary)
2. pretrain a small DiT of MDLM's architecture as an MDM on packed documents, then PRISM fine-tune it with
   the attention+linear quality head (the same engine as every other run)
3. a small GPT-2 trained on the same training documents, the gen-PPL scorer and MAUVE featuriser
4. the Table 2 layout over the recipe's rows and step counts (textgen/generate.py)
Every stage is reused when finished, so an interrupted demo continues where it stopped.
"""
from __future__ import annotations

import json
from pathlib import Path

from prism_ds.config import ConfigError, RunConfig
from prism_ds.engine.trainer import train
from prism_ds.jsonl import jsonl_rows
from prism_ds.text.packed_data import heldout_documents
from prism_ds.textgen import corpus  # called through the module, so a test can stand in a small corpus
from prism_ds.textgen.generate import text_table
from prism_ds.textgen.scorer_lm import train_causal_lm


def _scorer_documents(cfg: RunConfig, out: Path) -> Path:
    """The training documents without the held-out ones (the scorer must not have read MAUVE's references)."""
    held = set(heldout_documents(cfg.text))
    kept = [row for _, row in jsonl_rows(cfg.text.source) if row[cfg.text.text_field] not in held]
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": r[cfg.text.text_field]}) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(out)
    return out


def run_text_demo(cfg: RunConfig, progress: bool = True, overwrite: bool = False) -> str:
    """Corpus and tokenizer, pretraining, PRISM fine-tuning, scorer LM, and the Table 2 layout; returns the table."""
    if cfg.task != "packed_text" or cfg.model.kind != "dit":
        raise ConfigError("the text demo trains a DiT from scratch on packed documents (task=packed_text, "
                          "model.kind=dit); for a released MDLM checkpoint use `prism-ds train` and `prism-ds text-eval`")
    source = Path(cfg.text.source)
    if "," in cfg.text.source or source.suffix != ".jsonl":
        raise ConfigError(f"text.source={cfg.text.source!r}: the demo writes its corpus to one .jsonl file")
    train_file, _ = corpus.write_stdlib_corpus(source.parent, heldout_fraction=0.0)
    if train_file.resolve() != source.resolve():
        raise ConfigError(f"text.source={cfg.text.source!r}: the demo's corpus is written to {train_file}")
    corpus.train_bpe_tokenizer([train_file], cfg.text.tokenizer, vocab_size=2048)
    train(cfg, "pretrain", progress, overwrite)
    final = train(cfg, "finetune", progress, overwrite)
    scorer_docs = _scorer_documents(cfg, source.parent / "scorer_train.jsonl")
    train_causal_lm(scorer_docs, cfg.text.tokenizer, cfg.text_eval.scorer, seq_len=cfg.text.max_length,
                    steps=cfg.text_eval.scorer_steps, batch_size=16, progress=progress)
    table = text_table(cfg, final, progress)
    (Path(cfg.run_dir) / "results.md").write_text(table + "\n")
    return table
