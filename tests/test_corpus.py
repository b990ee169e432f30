"""The CPU text corpus (standard-library docstrings) and its byte-level BPE tokenizer: what is collected and
skipped, deterministic split, reuse, special ids with the mask last, round trips, and packing with them."""
import json
import textwrap
from pathlib import Path

import pytest

from prism_ds.textgen.corpus import EOT, MASK, train_bpe_tokenizer, write_stdlib_corpus

LONG = "This docstring is long enough to be kept as a document of the corpus. " * 4  # > 200 characters


def rows(path):
    return [json.loads(line)["text"] for line in Path(path).read_text(encoding="utf-8").split("\n") if line]


@pytest.fixture
def fake_stdlib(tmp_path):
    """A tiny standard library: kept, short, duplicated, indented, test/idlelib/site-packages and broken files."""
    root = tmp_path / "lib"
    files = {
        "a.py": f'"""Module a. {LONG}"""\n\ndef f():\n    """Too short."""\n\nclass C:\n    """Class C.\n\n'
                f'    {LONG}\n        indented line\n    """\n',
        "pkg/b.py": f'def g():\n    """Module a. {LONG}"""\n\nasync def h():\n    """Async h. {LONG}"""\n',
        "test/t.py": f'"""Test module. {LONG}"""\n',
        "pkg/tests/t2.py": f'"""Tests of pkg. {LONG}"""\n',
        "idlelib/i.py": f'"""IDLE. {LONG}"""\n',
        "site-packages/s.py": f'"""Third party. {LONG}"""\n',
        "broken.py": f'"""Broken. {LONG}"""\ndef (:\n',
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_corpus_from_fake_stdlib(fake_stdlib, tmp_path, capsys):
    train, held = write_stdlib_corpus(tmp_path / "out", heldout_fraction=0.3, seed=1, stdlib_dir=fake_stdlib)
    docs = rows(train) + rows(held)
    expected = {f"Module a. {LONG}".strip(), f"Class C.\n\n{LONG}\n    indented line", f"Async h. {LONG}".strip()}
    assert sorted(docs) == sorted(expected)  # deduplicated, cleaned, short and skipped files left out
    assert (len(rows(train)), len(rows(held))) == (2, 1)
    out = capsys.readouterr().out
    assert "2 files parsed (1 skipped)" in out and "4 docstrings" in out and "3 unique" in out
    # Deterministic: the same files again; another seed orders (and so splits) differently.
    again = write_stdlib_corpus(tmp_path / "again", heldout_fraction=0.3, seed=1, stdlib_dir=fake_stdlib)
    assert [p.read_bytes() for p in again] == [train.read_bytes(), held.read_bytes()]
    orders = {tuple(rows(write_stdlib_corpus(tmp_path / f"s{s}", 0.3, s, fake_stdlib)[0])) for s in range(6)}
    assert len(orders) > 1
    # Resumable: a second call reuses the files; other settings or a missing file rewrite them.
    stamp = train.stat().st_mtime_ns
    capsys.readouterr()
    write_stdlib_corpus(tmp_path / "out", heldout_fraction=0.3, seed=1, stdlib_dir=fake_stdlib)
    assert "reusing" in capsys.readouterr().out and train.stat().st_mtime_ns == stamp
    held.unlink()
    write_stdlib_corpus(tmp_path / "out", heldout_fraction=0.3, seed=1, stdlib_dir=fake_stdlib)
    assert "reusing" not in capsys.readouterr().out and held.exists()
    write_stdlib_corpus(tmp_path / "out", heldout_fraction=0.0, seed=1, stdlib_dir=fake_stdlib)
    assert "reusing" not in capsys.readouterr().out and rows(held) == [] and len(rows(train)) == 3
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "s.py").write_text('"""Short."""\n')
    with pytest.raises(ValueError, match="no docstring"):
        write_stdlib_corpus(tmp_path / "none", stdlib_dir=tmp_path / "short")


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory):
    """The real standard library's corpus (written once for this module)."""
    return write_stdlib_corpus(tmp_path_factory.mktemp("corpus"))


def test_real_stdlib_corpus(stdlib_corpus):
    train, held = (rows(p) for p in stdlib_corpus)
    assert len(train) > 1000 and 0.03 < len(held) / (len(train) + len(held)) < 0.07
    assert min(len(t) for t in train + held) >= 200 and len(set(train + held)) == len(train) + len(held)
    assert sum("return" in t.lower() for t in train) > 100  # English prose about code


def test_bpe_tokenizer(stdlib_corpus, tmp_path, capsys):
    from transformers import AutoTokenizer

    from prism_ds.text.tokenizer import special_ids

    train, held = stdlib_corpus
    folder = train_bpe_tokenizer([train], tmp_path / "tok", vocab_size=600)
    tok = AutoTokenizer.from_pretrained(str(folder))
    eot = tok.convert_tokens_to_ids(EOT)
    assert len(tok) == 600 and tok.mask_token == MASK and tok.mask_token_id == 599  # the mask is the last id
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == eot  # GPT-2's convention
    assert special_ids(tok) == (600, 599, eot)
    for text in rows(held)[:20] + ["naïve café — ünïcode ✓\n\ttabs  and  spaces ", "a [MASK] <|endoftext|> b"]:
        ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert tok.decode(ids) == text and 599 not in ids  # byte-level: every text round-trips
    assert tok("hello", add_special_tokens=True)["input_ids"] == tok("hello", add_special_tokens=False)["input_ids"]
    # Reused when trained from the same files; retrained when they change; a foreign folder is left alone.
    capsys.readouterr()
    stamp = (folder / "tokenizer.json").stat().st_mtime_ns
    assert train_bpe_tokenizer([train], tmp_path / "tok", vocab_size=600) == folder
    assert "reusing" in capsys.readouterr().out and (folder / "tokenizer.json").stat().st_mtime_ns == stamp
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows(held)[:30]))
    train_bpe_tokenizer([small], tmp_path / "tok", vocab_size=600)
    assert "reusing" not in capsys.readouterr().out
    assert AutoTokenizer.from_pretrained(str(folder)).mask_token_id == len(AutoTokenizer.from_pretrained(str(folder))) - 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "weights.bin").write_text("x")
    with pytest.raises(ValueError, match="other files"):
        train_bpe_tokenizer([small], tmp_path / "other", vocab_size=300)
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer([small], tmp_path / "tiny", vocab_size=100)


def test_packed_stdlib_with_bpe(stdlib_corpus, tmp_path):
    """The CPU recipe's data: GPT-2-style tokenizer (BOS == EOS), documents wrapped and packed."""
    from transformers import AutoTokenizer

    from prism_ds.config import TextDataConfig
    from prism_ds.text.packed_data import PackedTextStream, heldout_documents

    train, held = stdlib_corpus
    folder = train_bpe_tokenizer([train], tmp_path / "tok", vocab_size=600)
    tok = AutoTokenizer.from_pretrained(str(folder))
    cfg = TextDataConfig(source=str(train), tokenizer=str(folder), max_length=64, heldout_docs=8, shuffle_buffer=0)
    batch = next(iter(PackedTextStream(cfg, tok, 4)))
    eot = tok.eos_token_id
    assert batch.x.shape == (4, 64) and (batch.x[:, 0] == eot).all() and (batch.x[:, -1] == eot).all()
    first = rows(train)[8]  # the first training document follows the 8 held-out ones
    assert tok.decode(batch.x[0, 1:63]) == tok.decode(tok(first, add_special_tokens=False)["input_ids"][:62])
    assert heldout_documents(cfg) == rows(train)[:8]
    assert textwrap.dedent(first) == first  # cleaned docstrings: no common indentation left
