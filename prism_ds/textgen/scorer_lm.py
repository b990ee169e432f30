"""A small GPT-2 trained on the corpus, for CPU runs: the gen-PPL scorer and MAUVE featuriser when GPT-2 large
(the paper's choice) is out of reach. Its numbers are not comparable with the paper's, only between cells.

Documents are joined with the tokenizer's EOS (which also serves as BOS, so gen-PPL scores every sample's first
token after it, as GPT-2 saw document starts) and cut into seq_len chunks. The folder is a plain transformers
GPT2LMHeadModel + tokenizer; `scorer_settings.json`, written last, marks it finished and lets a rerun with the
same settings return at once.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from prism_ds.jsonl import jsonl_rows
from prism_ds.models.weights import content_hash
from prism_ds.textgen.samples import differing_keys, model_fingerprint

MARKER = "scorer_settings.json"


def _read_documents(path: Path) -> list[str]:
    docs = []
    for n, row in jsonl_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f"{path}, line {n}: expected an object with a \"text\" string")
        docs.append(row["text"])
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs


def _chunks(docs: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """The documents as one EOS-separated stream cut into [n, seq_len] chunks (the tail is dropped)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream += [eos] + list(ids)  # EOS before each document: the context a sample's first token is scored in
    n = len(stream) // seq_len
    if n < 2:
        raise ValueError(f"the corpus gives {len(stream)} tokens, fewer than two chunks of seq_len={seq_len}")
    return torch.tensor(stream[:n * seq_len]).view(n, seq_len)


def _lr(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def _eval_loss(model, chunks: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total = 0.0
    for b in range(0, len(chunks), batch_size):
        x = chunks[b:b + batch_size]
        total += model(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss.item() * len(x)
    model.train()
    return total / len(chunks)


def train_causal_lm(train_jsonl: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, n_layer: int = 2,
                    n_embd: int = 128, n_head: int = 4, seq_len: int = 128, steps: int = 1000, batch_size: int = 16,
                    lr: float = 1e-3, seed: int = 0, progress: bool = True) -> Path:
    """Train (or reuse) a small GPT2LMHeadModel on the JSONL's "text" documents; returns the saved folder."""
    train_jsonl, tokenizer_dir, out_dir = Path(train_jsonl), Path(tokenizer_dir), Path(out_dir)
    settings = {"train_jsonl": str(train_jsonl.resolve()), "train_sha256": content_hash([train_jsonl]),
                "tokenizer": model_fingerprint(tokenizer_dir), "n_layer": n_layer, "n_embd": n_embd,
                "n_head": n_head, "seq_len": seq_len, "steps": steps, "batch_size": batch_size, "lr": lr,
                "seed": seed}
    marker = out_dir / MARKER
    if marker.exists():
        done = json.loads(marker.read_text(encoding="utf-8"))["settings"]
        diff = differing_keys(done, settings)
        if not diff:
            return out_dir
        raise ValueError(f"{out_dir} holds a scorer trained with other settings ({', '.join(diff)} differ); "
                         f"choose another folder or delete it")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{tokenizer_dir}: the tokenizer has no EOS token to separate documents with")
    if tokenizer.bos_token_id is None:  # gen-PPL prepends BOS: make it the EOS every training document follows
        tokenizer.bos_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    chunks = _chunks(_read_documents(train_jsonl), tokenizer, seq_len)
    g = torch.Generator().manual_seed(seed)
    chunks = chunks[torch.randperm(len(chunks), generator=g)]
    n_val = max(1, len(chunks) // 20)  # 5% held out: a loss that says whether the scorer generalises
    val, train = chunks[:n_val], chunks[n_val:]

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=seq_len, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, min(100, steps // 10))
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(out_dir / "tb"))
    eval_every = max(1, steps // 5)
    bar = tqdm(range(steps), desc="training scorer LM", disable=not progress)
    loss_value = float("nan")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup)
        x = train[torch.randint(len(train), (batch_size,), generator=g)]
        loss = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss  # no padding
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = loss.item()
        if step % 10 == 0 or step == steps - 1:
            writer.add_scalar("scorer/train_loss", loss_value, step)
            writer.add_scalar("scorer/lr", opt.param_groups[0]["lr"], step)
            bar.set_postfix(loss=f"{loss_value:.3f}")
        if (step + 1) % eval_every == 0 or step == steps - 1:
            writer.add_scalar("scorer/val_loss", _eval_loss(model, val, batch_size), step)
    val_loss = _eval_loss(model, val, batch_size)
    writer.close()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    marker.write_text(json.dumps({"settings": settings, "train_loss": loss_value, "val_loss": val_loss,
                                  "val_ppl": math.exp(val_loss), "train_chunks": len(train), "val_chunks": n_val},
                                 indent=1), encoding="utf-8")
    return out_dir
