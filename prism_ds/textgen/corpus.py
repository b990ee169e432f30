"""A small English corpus every machine with Python has, and a tokenizer trained on it (recipe `text_cpu`).

`write_stdlib_corpus` collects the docstrings (module, class, function) of the Python standard library
into JSONL rows {"text": ...}: cleaned with inspect.cleandoc, at least `min_chars` long, deduplicated,
in a seeded order, split into train and held-out files. `train_bpe_tokenizer` trains a byte-level BPE
(GPT-2 style: <|endoftext|> is BOS, EOS, UNK and PAD) with "[MASK]" as the last id, as MDLM appends its
mask after GPT-2's vocabulary, and saves it as a folder `AutoTokenizer.from_pretrained` loads. Both skip
their work when their output exists and was made from the same inputs (a small meta file).
"""
from __future__ import annotations

import ast
import inspect
import json
import os
import platform
import random
import shutil
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from prism_ds.models.weights import content_hash

EOT, MASK = "<|endoftext|>", "[MASK]"
SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "site-packages", "__pycache__"}  # test code, IDE, 3rd party
CORPUS_META = "corpus_meta.json"
TOKENIZER_META = "prism_tokenizer_meta.json"
_TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", TOKENIZER_META}
_FORMAT = 1


def stdlib_files(root: str | Path) -> list[Path]:
    """The standard library's .py files under `root` in sorted order, without test/, idlelib/, site-packages/."""
    root = Path(root)
    files = [p for p in root.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def docstrings(path: str | Path) -> list[str]:
    """Cleaned module, class and function docstrings of one file in ast.walk order; SyntaxError etc. on bad files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old escapes in some modules warn (SyntaxWarning) but parse
        tree = ast.parse(Path(path).read_bytes(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append(inspect.cleandoc(doc).strip())
    return out


def _write_jsonl(path: Path, texts: list[str]) -> None:
    """Rows {"text": ...}, written to a temporary file first so a kill never leaves a half file in place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    os.replace(tmp, path)


def _read_meta(path: Path) -> dict | None:
    """A meta file's content, None when missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_stdlib_corpus(out_dir: str | Path, heldout_fraction: float = 0.05, seed: int = 0,
                        stdlib_dir: str | Path | None = None, min_chars: int = 200) -> tuple[Path, Path]:
    """(train.jsonl, heldout.jsonl) of standard-library docstrings in out_dir; reused when already written."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder {root} does not exist")
    out = Path(out_dir)
    train_path, heldout_path, meta_path = out / "train.jsonl", out / "heldout.jsonl", out / CORPUS_META
    settings = {"format": _FORMAT, "stdlib": str(root.resolve()), "python": platform.python_version(),
                "heldout_fraction": heldout_fraction, "seed": seed, "min_chars": min_chars}
    meta = _read_meta(meta_path)
    if meta and meta.get("settings") == settings and train_path.is_file() and heldout_path.is_file():
        print(f"stdlib corpus: reusing {train_path} ({meta['train']} documents) and {heldout_path} "
              f"({meta['heldout']} held out)")
        return train_path, heldout_path
    files, failed, found, unique = stdlib_files(root), 0, 0, {}
    for path in files:
        try:
            docs = docstrings(path)
        except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
            failed += 1  # e.g. lib2to3's Python 2 test data: not our text
            continue
        for doc in docs:
            if len(doc) >= min_chars:
                found += 1
                unique.setdefault(doc, None)  # dict keeps the first occurrence's order
    texts = list(unique)
    if not texts:
        raise ValueError(f"no docstring of at least {min_chars} characters under {root}")
    random.Random(seed).shuffle(texts)  # seeded order: the first rows are a sample of the whole library
    n_held = round(len(texts) * heldout_fraction) if heldout_fraction else 0
    n_held = min(max(n_held, 1 if heldout_fraction else 0), len(texts) - 1)
    out.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # the meta is written last: files without it are never reused
    _write_jsonl(heldout_path, texts[:n_held])
    _write_jsonl(train_path, texts[n_held:])
    meta_path.write_text(json.dumps({"settings": settings, "train": len(texts) - n_held, "heldout": n_held},
                                    indent=1), encoding="utf-8")
    print(f"stdlib corpus: {len(files) - failed} files parsed ({failed} skipped), {found} docstrings of >= "
          f"{min_chars} characters, {len(texts)} unique: {len(texts) - n_held} -> {train_path}, "
          f"{n_held} held out -> {heldout_path}")
    return train_path, heldout_path


def _texts(files: list[Path]) -> Iterator[str]:
    """Documents of JSONL files (their "text" column) and .txt files (each file one document)."""
    for path in files:
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8")
            continue
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    text = json.loads(line).get("text")
                    if not isinstance(text, str):
                        raise ValueError(f"{path}, line {n}: no string 'text' column")
                    yield text


def _fingerprint(files: list[Path]) -> list[list[str]]:
    """(name, sha256) of each training file: the tokenizer is retrained when its text changes."""
    return [[p.name, content_hash([p])] for p in files]


def train_bpe_tokenizer(files: list[str | Path] | str | Path, out_dir: str | Path, vocab_size: int = 4096) -> Path:
    """A byte-level BPE of vocab_size tokens (mask = vocab_size - 1) trained on files, saved in out_dir."""
    paths = [Path(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
    if not paths:
        raise ValueError("train_bpe_tokenizer: no training files")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer training file {p} does not exist")
    if vocab_size < 258:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs >= 258 ids (256 bytes, {EOT}, {MASK})")
    out = Path(out_dir)
    meta = {"format": _FORMAT, "vocab_size": vocab_size, "files": _fingerprint(paths)}
    if _read_meta(out / TOKENIZER_META) == meta and (out / "tokenizer.json").is_file():
        print(f"tokenizer: reusing {out} (trained on the same files)")
        return out
    strangers = sorted(f.name for f in out.iterdir() if f.name not in _TOKENIZER_FILES) if out.is_dir() else []
    if strangers:  # the folder is replaced whole: never delete what this function did not write
        raise ValueError(f"tokenizer folder {out} holds other files ({', '.join(strangers[:3])}); use a new folder")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # as GPT-2: no space added in front
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(paths), trainer)
    tok.add_special_tokens([MASK])  # appended after everything else: the last id, like MDLM's mask
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT,
                                   mask_token=MASK, clean_up_tokenization_spaces=False)
    assert fast.mask_token_id == len(fast) - 1, (fast.mask_token_id, len(fast))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(str(tmp))
    (tmp / TOKENIZER_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    small = " (the text supports no more merges)" if len(fast) < vocab_size else ""
    print(f"tokenizer: byte-level BPE of {len(fast)} tokens{small}, mask id {fast.mask_token_id} -> {out}")
    return out
