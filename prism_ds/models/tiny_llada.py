"""A tiny random LLaDA folder laid out exactly like GSAI-ML/LLaDA-8B-Instruct, for CPU smoke runs and tests.

`write_tiny_llada(out)` writes config.json (the official fields, small sizes), sharded safetensors with
an index, and a tokenizer whose special tokens sit at the official ids (BOS 126080, EOS = pad 126081,
`<|mdm_mask|>` 126336, headers 126346-126347, `<|eot_id|>` 126348, 269 added tokens in all) with the
official chat template. Ordinary text goes through a small byte-level BPE trained on Python's own
standard library (present on every machine); the ids up to 126079 that it does not use are inert
fillers, so the tokenizer has the official 126349 entries and the model the official 126464 rows.
"""
from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from prism_ds.models.llada import LLaDAConfig, LLaDAModelLM

BOS, EOS, CLS, GMASK, MASK = "<|startoftext|>", "<|endoftext|>", "[CLS]", "[gMASK]", "<|mdm_mask|>"
FIRST_SPECIAL_ID, MASK_ID, VOCAB_ROWS = 126080, 126336, 126464
ADDITIONAL = ["<role>", "</role>", "<|arithmetic_start|>", "<|arithmetic_end|>", "<|number_start|>", "<|number_end|>"]
HEADERS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# LLaDA-8B-Instruct's chat template, verbatim (tokenizer_config.json): BOS before the first message only.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}")
_CORPUS_MODULES = ("textwrap", "string", "heapq", "bisect", "fractions", "statistics", "functools", "enum",
                   "collections", "json.encoder", "csv", "calendar", "random", "re._parser", "difflib", "argparse",
                   "posixpath", "shutil", "glob", "fnmatch", "base64", "colorsys", "copy", "dataclasses", "gettext",
                   "ipaddress", "locale", "mimetypes", "ntpath", "operator", "pprint", "shlex", "tokenize",
                   "traceback", "urllib.parse", "html", "quopri", "sysconfig", "warnings", "zipfile", "inspect", "ast")


def special_tokens() -> list[str]:
    """The 269 added tokens of LLaDA-8B-Instruct in id order, starting at 126080."""
    reserved = [f"<|reserved_token_{i}|>" for i in range(256)]
    reserved[252] = MASK  # id 126336 holds the mask instead of reserved token 252
    return [BOS, EOS, CLS, GMASK, *reserved, *ADDITIONAL, *HEADERS]


def _stdlib_corpus() -> list[str]:
    return [inspect.getsource(importlib.import_module(name)) for name in _CORPUS_MODULES]


def build_tokenizer(out_dir: str | Path, bpe_vocab: int = 2048, compact: bool = False,
                    corpus: list[str] | None = None):
    """Train the small BPE (on `corpus`, default the standard library's source), pad the vocabulary to the
    official layout (compact: no padding, the specials follow the BPE tokens), add the specials; save it."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator(corpus or _stdlib_corpus(), trainers.BpeTrainer(
        vocab_size=bpe_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    spec = json.loads(trained.to_str())["model"]
    vocab = dict(spec["vocab"])
    if not compact:  # inert fillers (no merge makes them) put the specials at LLaDA's own ids
        vocab |= {f"<|tiny_unused_{i}|>": i for i in range(len(vocab), FIRST_SPECIAL_ID)}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens()])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=EOS, cls_token=CLS,
                                  additional_special_tokens=ADDITIONAL, add_bos_token=False, add_eos_token=False,
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out_dir))
    return tok


def tiny_config(d_model: int = 64, n_layers: int = 2, n_heads: int = 4, mlp_hidden_size: int = 128,
                vocab_rows: int = VOCAB_ROWS, mask_id: int = MASK_ID, eos_id: int = 126081):
    """The official config.json fields at a tiny size."""
    official = {"activation_type": "silu", "alibi": False, "block_type": "llama", "embedding_size": vocab_rows,
                "eos_token_id": eos_id, "pad_token_id": eos_id, "include_bias": False, "include_qkv_bias": False,
                "layer_norm_type": "rms", "mask_token_id": mask_id, "max_sequence_length": 4096, "rope": True,
                "rope_full_precision": True, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "scale_logits": False,
                "vocab_size": vocab_rows, "weight_tying": False, "architectures": ["LLaDAModelLM"]}
    return LLaDAConfig(d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
                       mlp_hidden_size=mlp_hidden_size, **official)


def write_code_pairs(out_dir: str | Path, max_lines: int = 40, max_prompt_chars: int = 160) -> tuple[Path, Path]:
    """Instruction/code pairs from the standard library's own functions (prompt: name, signature and the
    docstring's first line; solution: the source), as train.jsonl and heldout.jsonl (every 10th pair)."""
    rows = []
    for name in _CORPUS_MODULES:
        module = importlib.import_module(name)
        for fname, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ != module.__name__ or not fn.__doc__ or fname.startswith("_"):
                continue
            try:
                source = inspect.getsource(fn)
            except (OSError, TypeError):
                continue
            summary = fn.__doc__.strip().splitlines()[0]
            instruction = f"Write a Python function `{fname}{inspect.signature(fn)}`: {summary}"
            if len(source.splitlines()) <= max_lines and len(instruction) <= max_prompt_chars:
                rows.append({"instruction": instruction, "output": source})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = out / "train.jsonl", out / "heldout.jsonl"
    for file, part in zip(files, ([r for i, r in enumerate(rows) if i % 10], rows[::10])):
        file.write_text("".join(json.dumps(r) + "\n" for r in part))
    return files


def write_tiny_llada(out_dir: str | Path, seed: int = 0, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                     mlp_hidden_size: int = 128, max_shard_size: str | None = None, compact: bool = False,
                     corpus: list[str] | None = None, dtype: str = "float32") -> Path:
    """Write a random tiny LLaDA folder (config, sharded safetensors + index, tokenizer); returns its path.

    dtype: the weights' dtype on disk, float32 or bfloat16 (LLaDA-8B-Instruct's own files are bfloat16).
    compact: the vocabulary is the BPE's own plus the specials (a few thousand rows instead of 126464), for
    models trained from scratch on CPU; ids then differ from LLaDA's, names and chat template do not.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, compact=compact, corpus=corpus)
    ids = {} if not compact else {"vocab_rows": -(-len(tok) // 64) * 64, "mask_id": tok.convert_tokens_to_ids(MASK),
                                  "eos_id": tok.eos_token_id}
    torch.manual_seed(seed)
    model = LLaDAModelLM(tiny_config(d_model, n_layers, n_heads, mlp_hidden_size, **ids)).to(getattr(torch, dtype))
    if max_shard_size is None:  # small shards exercise the sharded layout; a ~1B model (the GPU kit) needs few files
        max_shard_size = "20MB" if sum(p.numel() for p in model.parameters()) < 100_000_000 else "2GB"
    model.save_pretrained(str(out), max_shard_size=max_shard_size, safe_serialization=True)
    return out


def jsonl_corpus(path: str | Path) -> list[str]:
    """Every string field of a JSONL file's rows (e.g. MBPP's problem texts and code), as a BPE corpus."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--corpus {path}: no such file")
    texts = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not a JSON object ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: not a JSON object")
            texts += [v for v in row.values() if isinstance(v, str)]
    return texts
