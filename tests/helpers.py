"""Shared test helpers: tiny run configs, subprocess environment, TensorBoard reading, and text fixtures.

Everything is built offline: the text fixtures are a WordLevel tokenizer over a fixed word list with
LLaDA's special tokens, wrapped as PreTrainedTokenizerFast, and small JSONL/parquet files.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from prism_ds.config import TextDataConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LLADA_REFERENCE = SHARED / "reference" / "llada-8b-instruct"  # the official folder's small files


def tiny_overrides(run_dir, **extra) -> list[str]:
    """Overrides that shrink the CPU recipe to seconds: 4x4 boards and a one-block DiT."""
    # Native kernels: pytest has computed before a test's run starts, so "portable" could not take effect.
    values = {"run_dir": str(run_dir), "cpu_kernels": "native", "data.box_rows": 2, "data.box_cols": 2,
              "data.n_train": 300, "data.n_eval": 40, "data.blanks": 8, "model.hidden": 32, "model.n_blocks": 1,
              "model.n_heads": 2, "model.cond_dim": 16, "pretrain.steps": 40, "pretrain.micro_batch_size": 32,
              "pretrain.log_every": 10, "pretrain.warmup_steps": 5, "finetune.steps": 30,
              "finetune.micro_batch_size": 32, "finetune.log_every": 10, "finetune.warmup_steps": 5, "prism.k": 2,
              "sampler.steps": "[2,4]", "sampler.batch_size": 40}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def tiny_llada_folder(directory) -> Path:
    """A tiny random LLaDA folder in the official layout (config, sharded safetensors, tokenizer) plus code pairs
    in directory/data, written by the same code as `prism-ds make-tiny-llada`; returns the model folder."""
    from prism_ds.models.tiny_llada import write_code_pairs, write_tiny_llada

    write_code_pairs(Path(directory) / "data")
    return write_tiny_llada(Path(directory) / "model")


def subprocess_env() -> dict:
    """Environment for launching prism-ds / deepspeed in a child process on CPU."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # in-process training set these; the launcher must choose its own
    return env


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_scalars(tb_dir) -> dict[str, list[float]]:
    """Every scalar series of a TensorBoard log directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


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


def roundtrip(state):
    """A stream state as a checkpoint holds it (torch.save / torch.load)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def same_batch(a, b) -> bool:
    """Two TextBatches hold the same tokens, fixed positions, answer lengths and token counts."""
    return (a.x.equal(b.x) and a.fixed.equal(b.fixed) and a.answer_len.equal(b.answer_len)
            and a.tokens == b.tokens)

