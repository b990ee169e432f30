"""Packed documents (task=packed_text, MDLM's OpenWebText wrapping): BOS/EOS layout and chunk boundaries, leftovers
carried over, rank shards, exact resume, held-out documents, bad inputs, and the task built from a run config."""
from dataclasses import replace

import pytest

from prism_ds.config import ConfigError, ModelConfig, RunConfig
from prism_ds.text.packed_data import PackedTextStream, heldout_documents, heldout_sequences
from prism_ds.text.prompt_data import load_tokenizer, resolve_source
from helpers import (BOS, EOS, MASK, SPECIALS, WORDS, build_tokenizer, roundtrip, same_batch, text_config, token_id,
                     write_jsonl, write_parquet)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """The fixture WordLevel tokenizer: BOS <|startoftext|> differs from EOS <|endoftext|>, so swaps show."""
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "plain")


def ids(text):
    """Fixture-tokenizer ids of space-separated words / special tokens."""
    return [token_id(w) for w in text.split()]


def stream(cfg, mbs=1, rank=0, world_size=1):
    return PackedTextStream(cfg, load_tokenizer(cfg), mbs, rank=rank, world_size=world_size)


def take(it, n):
    return [next(it) for _ in range(n)]


def number_docs(n):
    """Document i repeats the number i (1 to 3 times), so every token names the document it came from."""
    return [{"text": " ".join([str(i)] * (1 + i % 3))} for i in range(n)]


def doc_numbers(batches):
    """The set of document numbers in batches (BOS/EOS left out)."""
    return {int((SPECIALS + WORDS)[t]) for b in batches for t in b.x.flatten().tolist()
            if (SPECIALS + WORDS)[t] not in SPECIALS}


def test_packing_matches_hand_built(tok_dir, tmp_path):
    docs = ["what is 1", "the answer is 2 plus 3", "say 4", "5 6 7 8 9 10 11 12 13", "14"]
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs)])
    s = stream(text_config(src, tok_dir, max_length=7), mbs=2)  # chunks of 7 - 2 = 5 tokens
    it = iter(s)
    b1, b2 = take(it, 2)
    # The token stream is every document + EOS, in file order, cut every 5 tokens; each chunk is BOS .. EOS.
    assert b1.x.tolist() == [ids(f"{BOS} what is 1 {EOS} the {EOS}"),
                             ids(f"{BOS} answer is 2 plus 3 {EOS}")]
    assert b2.x.tolist() == [ids(f"{BOS} {EOS} say 4 {EOS} 5 {EOS}"),  # a chunk may start with a document's EOS
                             ids(f"{BOS} 6 7 8 9 10 {EOS}")]
    assert not b1.fixed.any() and b1.answer_len.tolist() == [7, 7] and (b1.pad_tokens, b1.tokens) == (0, 14)
    # What is left after batch 2 is carried over, not dropped: it starts batch 3, then epoch 2 follows.
    assert s.state_dict()["buffer"].tolist()[:6] == ids(f"11 12 13 {EOS} 14 {EOS}")
    b3 = next(it)
    assert b3.x.tolist() == [ids(f"{BOS} 11 12 13 {EOS} 14 {EOS}"), ids(f"{BOS} {EOS} what is 1 {EOS} {EOS}")]
    assert s.stats["tokens"] == 42 and s.counters()["documents"] >= 5


@pytest.mark.parametrize("two_files,heldout", [(False, 0), (True, 0), (False, 4)])
def test_two_ranks_disjoint_and_complete(tok_dir, tmp_path, two_files, heldout):
    docs = number_docs(23)
    if two_files:  # shards are whole files
        src = ",".join([write_jsonl(tmp_path / "a.jsonl", docs[:12]), write_jsonl(tmp_path / "b.jsonl", docs[12:])])
    else:  # one file: ranks take every other row
        src = write_jsonl(tmp_path / "a.jsonl", docs)
    cfg = text_config(src, tok_dir, max_length=6, shuffle_buffer=4, heldout_docs=heldout)
    per_epoch = {}  # epoch -> rank -> documents read
    for rank in (0, 1):
        s = stream(cfg, mbs=2, rank=rank, world_size=2)
        rows = s._start()  # the shard's documents, epoch by epoch (what the packer reads)
        while True:
            doc = s._document(next(rows))
            if s._epoch == 3:
                break
            per_epoch.setdefault(s._epoch, {}).setdefault(rank, []).append(int(doc.split()[0]))
    for epoch, mine in per_epoch.items():  # each epoch (reshuffled) partitions the documents among the ranks
        assert mine[0] and mine[1] and not set(mine[0]) & set(mine[1]), epoch
        assert sorted(mine[0] + mine[1]) == list(range(23))
    # ... and training never packs a held-out one, on either rank.
    for rank in (0, 1):
        s = stream(cfg, mbs=2, rank=rank, world_size=2)
        it = iter(s)
        batches = [next(it) for _ in range(12)]
        assert doc_numbers(batches) and not doc_numbers(batches) & set(range(heldout))




def write_source(tmp_path, kind, docs):
    """docs as one JSONL file, one parquet file, or one .txt file per document (in a folder)."""
    if kind == "txt":
        folder = tmp_path / "txt"
        folder.mkdir()
        for i, d in enumerate(docs):
            (folder / f"doc{i:03d}.txt").write_text(d["text"] + "\n", encoding="utf-8")
        return str(folder)
    return (write_parquet if kind == "parquet" else write_jsonl)(tmp_path / f"d.{kind}", docs)


@pytest.mark.parametrize("kind,shuffle_buffer,world_size,heldout",
                         [("jsonl", 0, 1, 0), ("jsonl", 5, 1, 3), ("parquet", 0, 2, 2), ("jsonl", 4, 2, 0),
                          ("txt", 0, 1, 2)])
def test_exact_resume(tok_dir, tmp_path, kind, shuffle_buffer, world_size, heldout):
    # Shuffled parquet is left out: HF sleeps 5 s whenever such an iterator shuts down (an arrow workaround).
    src = write_source(tmp_path, kind, number_docs(19))
    cfg = text_config(src, tok_dir, max_length=9, shuffle_buffer=shuffle_buffer, seed=3, heldout_docs=heldout)
    rank, n = world_size - 1, 12
    ref_stream = stream(cfg, mbs=2, rank=rank, world_size=world_size)
    ref = take(iter(ref_stream), n)
    assert ref_stream.state_dict()["epoch"] >= 2  # the run crosses epoch boundaries
    leftovers = []
    for k in (1, 4, 7):
        s = stream(cfg, mbs=2, rank=rank, world_size=world_size)
        it = iter(s)
        take(it, k)
        state, stats = roundtrip(s.state_dict()), dict(s.stats)
        leftovers.append(len(state["buffer"]))
        fresh = stream(cfg, mbs=2, rank=rank, world_size=world_size)
        fresh.load_state_dict(state)
        assert fresh.stats == stats
        rest = take(iter(fresh), n - k)
        assert all(same_batch(a, b) for a, b in zip(rest, ref[k:])), f"resume after {k} batches differs"
        assert fresh.stats == ref_stream.stats
        take(it, 2)  # the same object rewound to the saved state (the trainer's reload) continues identically
        s.load_state_dict(state)
        assert all(same_batch(a, b) for a, b in zip(take(iter(s), 3), ref[k:k + 3]))
    assert any(leftovers)  # the carried-over tokens are part of the position
    if shuffle_buffer:  # shuffled
        order = [t for b in ref for t in b.x.flatten().tolist()]
        assert order != sorted(order)


def test_heldout_documents_never_trained(tok_dir, tmp_path):
    docs = number_docs(20)
    docs.insert(13, {"text": docs[1]["text"]})  # a later copy of held-out document 1 is not trained on either
    docs.insert(2, {"text": "   "})  # empty documents are skipped and not counted
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    cfg = text_config(src, tok_dir, max_length=6, shuffle_buffer=3, heldout_docs=5)
    assert heldout_documents(cfg) == ["0", "1 1", "2 2 2", "3", "4 4"]
    assert heldout_documents(cfg, 2) == ["0", "1 1"]
    seqs = heldout_sequences(cfg, load_tokenizer(cfg), 10)  # packed as training packs, last partial chunk dropped
    assert seqs.tolist() == [ids(f"{BOS} 0 {EOS} 1 1 {EOS}"), ids(f"{BOS} {EOS} 2 2 2 {EOS}"),
                             ids(f"{BOS} {EOS} 3 {EOS} 4 {EOS}")]
    assert heldout_sequences(cfg, load_tokenizer(cfg), 2).shape == (2, 6)
    for rank, world_size in ((0, 1), (0, 2), (1, 2)):
        s = stream(cfg, mbs=2, rank=rank, world_size=world_size)
        it, batches = iter(s), []
        while s.state_dict()["epoch"] < 2:
            batches.append(next(it))
        assert not doc_numbers(batches) & set(range(5)), (rank, world_size)
        assert s.stats["heldout_skipped"] > 0
    with pytest.raises(ConfigError, match="text.heldout_docs"):
        heldout_documents(cfg, 6)  # more than are held out
    with pytest.raises(ConfigError, match="text.heldout_docs"):
        heldout_sequences(replace(cfg, heldout_docs=1), load_tokenizer(cfg), 4)  # too short for one sequence
    for fn in (lambda c: heldout_documents(c, 3), lambda c: heldout_sequences(c, load_tokenizer(c), 3)):
        with pytest.raises(ConfigError, match="text.heldout_docs"):
            fn(replace(cfg, heldout_docs=0))
    with pytest.raises(ConfigError, match="text.heldout_docs=25"):  # nothing left to train on
        next(iter(stream(replace(cfg, heldout_docs=25))))


def error(cfg, n=1, exc=ValueError):
    """The message of the error raised while building a stream and reading n batches."""
    with pytest.raises(exc) as e:
        take(iter(stream(cfg)), n)
    return str(e.value)


def test_bad_inputs_name_file_row_and_setting(tok_dir, tmp_path):
    good = number_docs(6)
    src = write_jsonl(tmp_path / "missing.jsonl", good[:3] + [{"body": "1 2"}] + good[3:])
    msg = error(text_config(src, tok_dir, max_length=6), 4)
    assert "missing.jsonl, line 4" in msg and "'text'" in msg and "text.text_field" in msg and "body" in msg
    src = write_jsonl(tmp_path / "field.jsonl", [{"body": d["text"]} for d in good])
    assert stream(text_config(src, tok_dir, max_length=6, text_field="body")).cfg.text_field == "body"
    msg = error(text_config(src, tok_dir, max_length=6))  # no row has the configured column
    assert "field.jsonl, line 1" in msg and "text.text_field" in msg
    src = write_jsonl(tmp_path / "notstr.jsonl", good[:2] + [{"text": ["1", "2"]}])
    msg = error(text_config(src, tok_dir, max_length=6), 3)
    assert "notstr.jsonl, line 3" in msg and "is not text" in msg and "text.text_field" in msg
    src = write_parquet(tmp_path / "num.parquet", [{"text": d["text"], "n": 1} for d in good] + [{"text": None, "n": 2}])
    msg = error(text_config(src, tok_dir, max_length=6), 5)
    assert "num.parquet, row 7" in msg and "'text'" in msg
    src = write_jsonl(tmp_path / "blank.jsonl", [{"text": " "}, {"text": ""}])
    msg = error(text_config(src, tok_dir, max_length=6))
    assert "only empty documents" in msg and "text.text_field" in msg
    (tmp_path / "empty.jsonl").write_text("")
    assert "text.source" in error(text_config(str(tmp_path / "empty.jsonl"), tok_dir, max_length=6))
    (tmp_path / "latin1.txt").write_bytes(b"one\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1\.txt, line 2: not valid UTF-8"):
        stream(text_config(str(tmp_path / "latin1.txt"), tok_dir))
    for key, value in (("max_length", 2), ("text_field", ""), ("shuffle_buffer", -1), ("heldout_docs", -1)):
        with pytest.raises(ConfigError, match=f"text.{key}"):
            stream(text_config(write_jsonl(tmp_path / "ok.jsonl", good), tok_dir, **{key: value}))
    (tmp_path / "rows.csv").write_text("text\n1\n")
    with pytest.raises(ConfigError, match="text.source: unsupported file type"):
        stream(text_config(str(tmp_path / "rows.csv"), tok_dir))
    with pytest.raises(ConfigError, match="text.source: unsupported file type"):  # .txt is for documents only
        resolve_source(str(tmp_path / "latin1.txt"))
    with pytest.raises(ConfigError, match="text.source: mixes"):
        stream(text_config(f"{tmp_path / 'ok.jsonl'},{tmp_path / 'num.parquet'}", tok_dir))


def test_tokenizer_without_bos_is_named(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "a a"}])
    with pytest.raises(ConfigError, match="text.tokenizer: .*bos_token"):
        PackedTextStream(text_config(src, "unused"), tok, 1)


def test_packed_task(tok_dir, tmp_path, monkeypatch):
    from prism_ds.engine import data_source

    src = write_jsonl(tmp_path / "d.jsonl", number_docs(40))
    text = text_config(src, tok_dir, max_length=8, heldout_docs=6)
    cfg = replace(RunConfig(), task="packed_text", text=text)
    task = data_source.build_task(cfg, 3, 0, 1, progress=False)
    vocab = len(load_tokenizer(text))
    assert (task.vocab_size, task.mask_id, task.seq_len, task.maskable) == (vocab, token_id(MASK), 8, 8)
    assert task.allowed_tokens.tolist() == [i != token_id(MASK) for i in range(vocab)]
    expected = heldout_sequences(text, load_tokenizer(text), data_source.HELDOUT_SAMPLES)
    assert task.heldout.x.equal(expected) and not task.heldout.fixed.any()
    assert task.heldout.lengths.tolist() == [8.0] * len(expected)
    b = task.source.next_batch()
    assert b.x.shape == (3, 8) and b.lengths.tolist() == [8.0] * 3 and not b.fixed.any()
    assert set(task.source.counters()) == {"documents", "heldout_skipped"}
    state = roundtrip(task.source.state_dict())
    after = task.source.next_batch()
    task.source.load_state_dict(state)
    assert task.source.next_batch().x.equal(after.x)
    assert data_source.build_task(replace(cfg, text=replace(text, heldout_docs=0)), 3, 0, 1, False).heldout is None
    # kind=mdlm: the tokenizer defaults to the model folder, and the checkpoint decides vocabulary and mask.
    calls = []

    def fake_vocab_and_mask(path, tokenizer):
        calls.append(path)
        return len(tokenizer) + 2, len(tokenizer) + 1  # two embedding rows past the tokenizer, the last the mask

    import prism_ds.models.mdlm as mdlm

    monkeypatch.setattr(mdlm, "vocab_and_mask", fake_vocab_and_mask)
    mcfg = replace(cfg, model=replace(ModelConfig(), kind="mdlm", path=tok_dir), text=replace(text, tokenizer=""))
    task = data_source.build_task(mcfg, 3, 0, 1, progress=False)
    assert calls == [tok_dir] and (task.vocab_size, task.mask_id) == (vocab + 2, vocab + 1)
    assert task.allowed_tokens.tolist() == [True] * vocab + [False, False]
    with pytest.raises(ConfigError, match="model.kind"):
        data_source.build_task(replace(cfg, model=replace(ModelConfig(), kind="llada", path=tok_dir)), 3, 0, 1, False)
