"""Test helpers for the text pipeline: a tiny LLaDA-style tokenizer saved locally and small JSONL/parquet files.

Everything is built offline: a WordLevel tokenizer over a fixed word list, wrapped as PreTrainedTokenizerFast.
"""
from __future__ import annotations

import json
from pathlib import Path

from prism_ds.config import TextDataConfig

BOS, EOS, MASK = "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>"
HEADER_START, HEADER_END, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
UNK = "<|unk|>"
SPECIALS = [UNK, BOS, EOS, MASK, HEADER_START, HEADER_END, EOT]
WORDS = (["what", "is", "plus", "minus", "times", "the", "answer", "add", "say", "please", "user", "assistant",
          "system", "you", "are", "helpful", "question", "solve", "?", ".", ":", "="]
         + [str(i) for i in range(100)])

# LLaDA-like chat template: every turn is "<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_tokenizer(directory: str | Path, chat_template: bool = False) -> str:
    """Build a WordLevel tokenizer with LLaDA special tokens, save it with save_pretrained; returns the dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    # Like LLaDA: no mask_token attribute, the mask is the added special token <|mdm_mask|>.
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                  additional_special_tokens=[MASK, HEADER_START, HEADER_END, EOT])
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(directory))
    return str(directory)


make_tokenizer = build_tokenizer  # the name the brief's tests use


def token_id(word: str) -> int:
    """Id of one vocabulary entry of the fixture tokenizer."""
    return (SPECIALS + WORDS).index(word)


def arithmetic_rows(n: int, start: int = 0) -> list[dict]:
    """n prompt/solution rows with varied lengths; each row's prompt is unique (carries its index)."""
    rows = []
    for i in range(start, start + n):
        prompt = f"question {i % 100} : what is {i % 7} plus {i % 5} ?" + " please" * (i % 4)
        solution = " ".join(str((i + j) % 100) for j in range(1 + (i * 7) % 11))
        rows.append({"prompt": prompt, "solution": solution})
    return rows


def sample_rows(n: int, start: int = 0) -> list[dict]:
    """n prompt/solution pairs of varied lengths (prompts 9-12 tokens, solutions 1-11 tokens)."""
    return arithmetic_rows(n, start)


def write_jsonl(path: str | Path, rows: list[dict]) -> str:
    """Write rows as JSON lines; returns the path."""
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_parquet(path: str | Path, rows: list[dict]) -> str:
    """Write rows as one parquet file; returns the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def text_config(source: str, tokenizer: str, **overrides) -> TextDataConfig:
    """A TextDataConfig for tests with short sequences."""
    values = dict(source=source, tokenizer=tokenizer, max_length=24, padding="eos", shuffle_buffer=0, seed=0)
    values.update(overrides)
    return TextDataConfig(**values)
