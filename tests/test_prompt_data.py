"""The streaming prompt/solution pipeline: token layout, chat templates, over-long rows, padding modes,
rank sharding, exact resume and the errors for bad input."""

import pytest
import torch

from prism_ds.config import ConfigError
from prism_ds.text.prompt_data import PromptSolutionStream, load_tokenizer, special_ids
from helpers import (BOS, EOS, EOT, HEADER_END, HEADER_START, MASK, SPECIALS, WORDS, build_tokenizer, roundtrip, same_batch,
                     sample_rows, text_config, token_id, write_jsonl, write_parquet)


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    """(plain tokenizer dir, chat-template tokenizer dir)."""
    root = tmp_path_factory.mktemp("tok")
    return build_tokenizer(root / "plain", chat_template=False), build_tokenizer(root / "chat", chat_template=True)


def ids(*words):
    """Fixture-tokenizer ids of words / special tokens."""
    return [token_id(w) for w in words]


def stream(cfg, mbs=1, rank=0, world_size=1):
    return PromptSolutionStream(cfg, load_tokenizer(cfg), mbs, rank=rank, world_size=world_size)


def take(it, n):
    return [next(it) for _ in range(n)]


def row_index(position, batch):
    """Row ids of a batch: the number at `position` (after BOS and 'question') in each prompt."""
    return [int((SPECIALS + WORDS)[int(t)]) for t in batch.x[:, position]]


def test_tokenizer_special_ids(tok_dirs, tmp_path):
    cfg = text_config("unused", tok_dirs[0])
    vocab, mask, eos = special_ids(load_tokenizer(cfg))
    assert (mask, eos) == (token_id(MASK), token_id(EOS)) and vocab == len(load_tokenizer(cfg))
    with pytest.raises(ConfigError, match="text.tokenizer"):
        load_tokenizer(text_config("unused", str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="text.tokenizer"):
        load_tokenizer(text_config("unused", ""))


def test_layout_eos_padding(tok_dirs, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "what is 2 plus 3 ?", "solution": "5"}])
    s = stream(text_config(src, tok_dirs[0], max_length=12))
    b = next(iter(s))
    prompt = ids(BOS, "what", "is", "2", "plus", "3", "?")
    assert b.x.tolist() == [prompt + ids("5") + ids(EOS) * 4]
    assert b.fixed.tolist() == [[True] * 7 + [False] * 5]
    assert b.answer_len.tolist() == [5] and b.answer_len.dtype == torch.long  # 5, EOS and 3 EOS pads
    assert (b.pad_tokens, b.tokens) == (3, 12)
    assert s.stats == {"samples": 1, "truncated": 0, "truncated_tokens": 0, "dropped": 0, "pad_tokens": 3, "tokens": 12}
    # A custom plain template wraps the prompt.
    b = next(iter(stream(text_config(src, tok_dirs[0], max_length=12, template="question : {prompt}"))))
    assert b.x[0, :4].tolist() == ids(BOS, "question", ":", "what")


def test_chat_template(tok_dirs, tmp_path):
    msgs = [{"role": "system", "content": "you are helpful"}, {"role": "user", "content": "what is 2 plus 3 ?"},
            {"role": "assistant", "content": "5"}, {"role": "user", "content": "times 2 ?"},
            {"role": "assistant", "content": "10"}]
    src = write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}])
    b = next(iter(stream(text_config(src, tok_dirs[1], max_length=48, messages_field="messages"))))

    def turn(role, *words):
        return ids(HEADER_START, role, HEADER_END, *words)
    prompt = (ids(BOS) + turn("system", "you", "are", "helpful") + ids(EOT)
              + turn("user", "what", "is", "2", "plus", "3", "?") + ids(EOT) + turn("assistant", "5") + ids(EOT)
              + turn("user", "times", "2", "?") + ids(EOT) + turn("assistant"))
    n = len(prompt)
    assert b.x[0, :n + 2].tolist() == prompt + ids("10", EOS)
    assert b.fixed[0].tolist() == [True] * n + [False] * (48 - n)
    assert b.answer_len.tolist() == [48 - n]
    # prompt/solution columns with a chat template: the prompt is one user turn.
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "what is 1 ?", "solution": "1"}])
    b = next(iter(stream(text_config(src, tok_dirs[1], max_length=16))))
    prompt = ids(BOS) + turn("user", "what", "is", "1", "?") + ids(EOT) + turn("assistant")
    assert b.x[0, :len(prompt) + 2].tolist() == prompt + ids("1", EOS)
    assert b.fixed[0].sum() == len(prompt)


def test_overlong_truncate_and_drop(tok_dirs, tmp_path):
    rows = [{"prompt": "what is 1", "solution": "1 2 3 4 5 6"},  # 4 + 6 + 1 = 11 tokens
            {"prompt": "what is 2", "solution": "2"},  # 6 tokens: fits
            {"prompt": "what is the answer to 1 plus 2", "solution": "3"}]  # prompt alone is 9 tokens
    src = write_jsonl(tmp_path / "o.jsonl", rows)
    s = stream(text_config(src, tok_dirs[0], max_length=8, overlong="truncate"))
    b1, b2 = take(iter(s), 2)
    assert b1.x.tolist() == [ids(BOS, "what", "is", "1", "1", "2", "3", "4")]  # answer cut, no EOS
    assert (b1.answer_len.tolist(), b1.pad_tokens) == ([4], 0)
    assert b2.x[0, :6].tolist() == ids(BOS, "what", "is", "2", "2", EOS)
    assert (s.stats["truncated"], s.stats["dropped"], s.stats["samples"]) == (1, 0, 2)
    assert s.stats["truncated_tokens"] == 11 - 8
    with pytest.raises(ValueError, match=r"o.jsonl, line 3: the prompt alone is 9 tokens, not shorter than "
                                         r"text.max_length=8; .* text.overlong=drop"):
        next(iter(s))  # row 3's prompt is too long even to truncate: truncation cannot keep any answer
    s = stream(text_config(src, tok_dirs[0], max_length=8, overlong="drop"))
    b = next(iter(s))
    assert b.x[0, :6].tolist() == ids(BOS, "what", "is", "2", "2", EOS)
    assert (s.stats["truncated"], s.stats["dropped"], s.stats["samples"]) == (0, 1, 1)


def test_bucket_padding_wastes_less(tok_dirs, tmp_path):
    src = write_jsonl(tmp_path / "b.jsonl", sample_rows(48))
    waste = {}
    for padding in ("eos", "bucket"):
        s = stream(text_config(src, tok_dirs[0], max_length=32, padding=padding, bucket_pool=4), mbs=4)
        batches = take(iter(s), 12)  # 48 rows: one epoch in both modes
        assert s.stats["samples"] == 48 and s.stats["pad_tokens"] == sum(b.pad_tokens for b in batches)
        for b in batches:
            lens = b.fixed.sum(1) + b.answer_len
            assert (lens == b.x.shape[1]).all() and b.x.shape[1] <= 32
            # the prompt is a prefix; everything after the sample's own end is EOS
            assert (b.fixed.long().diff(dim=1) <= 0).all()
        waste[padding] = s.stats["pad_tokens"] / s.stats["tokens"]
    assert waste["bucket"] < waste["eos"] / 2, waste


@pytest.mark.parametrize("two_files", [False, True])
def test_two_ranks_disjoint_and_complete(tok_dirs, tmp_path, two_files):
    rows = sample_rows(21)
    if two_files:  # shards are whole files
        src = ",".join([write_jsonl(tmp_path / "a.jsonl", rows[:11]), write_jsonl(tmp_path / "b.jsonl", rows[11:])])
    else:  # one file: ranks take every other row
        src = write_jsonl(tmp_path / "a.jsonl", rows)
    seen = []
    for rank in (0, 1):
        s = stream(text_config(src, tok_dirs[0], max_length=32, shuffle_buffer=4), rank=rank, world_size=2)
        it, mine = iter(s), []
        while True:
            b = next(it)
            if s.state_dict()["epoch"] > 0:
                break
            mine += row_index(2, b)
        assert mine
        seen.append(mine)
    assert sorted(seen[0] + seen[1]) == list(range(21))
    with pytest.raises(ValueError, match="rank"):  # a state of rank 0 cannot resume rank 1
        stream(text_config(src, tok_dirs[0]), rank=1, world_size=2).load_state_dict(
            stream(text_config(src, tok_dirs[0]), rank=0, world_size=2).state_dict())




@pytest.mark.parametrize("padding,shuffle_buffer,world_size,parquet",
                         [("eos", 0, 1, False), ("eos", 5, 1, False), ("bucket", 0, 1, True),
                          ("bucket", 5, 1, False), ("eos", 4, 2, False)])
def test_exact_resume(tok_dirs, tmp_path, padding, shuffle_buffer, world_size, parquet):
    # Shuffled parquet is left out: HF sleeps 5 s whenever such an iterator shuts down (an arrow workaround).
    rows = sample_rows(17)
    writer = write_parquet if parquet else write_jsonl
    src = writer(tmp_path / ("d.parquet" if parquet else "d.jsonl"), rows)
    cfg = text_config(src, tok_dirs[0], max_length=28, padding=padding, shuffle_buffer=shuffle_buffer,
                      bucket_pool=2, seed=3)
    n = 14
    ref_stream = stream(cfg, mbs=3, rank=world_size - 1, world_size=world_size)
    ref = take(iter(ref_stream), n)
    assert ref_stream.state_dict()["epoch"] >= 2  # the run crosses epoch boundaries
    if shuffle_buffer:  # shuffled, and differently in each epoch
        order = [i for b in ref for i in row_index(2, b)]
        per_epoch = len(rows) // world_size
        assert order[:per_epoch] != sorted(order[:per_epoch]) or padding == "bucket"
        assert order[:per_epoch] != order[per_epoch:2 * per_epoch]
    for k in (1, 5, 6, 9):
        s = stream(cfg, mbs=3, rank=world_size - 1, world_size=world_size)
        it = iter(s)
        take(it, k)
        state, stats = roundtrip(s.state_dict()), dict(s.stats)
        fresh = stream(cfg, mbs=3, rank=world_size - 1, world_size=world_size)
        fresh.load_state_dict(state)
        assert fresh.stats == stats
        rest = take(iter(fresh), n - k)
        assert all(same_batch(a, b) for a, b in zip(rest, ref[k:])), f"resume after {k} batches differs"
        assert fresh.stats == ref_stream.stats
        # The same object rewound to the saved state (the trainer's reload) continues identically too.
        take(it, 2)
        s.load_state_dict(state)
        assert all(same_batch(a, b) for a, b in zip(take(iter(s), 3), ref[k:k + 3]))


def test_sources_glob_and_parquet_match_jsonl(tok_dirs, tmp_path):
    rows = sample_rows(9)
    write_jsonl(tmp_path / "x1.jsonl", rows[:4])
    write_jsonl(tmp_path / "x2.jsonl", rows[4:])
    pq = write_parquet(tmp_path / "all.parquet", rows)
    a = take(iter(stream(text_config(str(tmp_path / "x*.jsonl"), tok_dirs[0]), mbs=3)), 3)
    b = take(iter(stream(text_config(pq, tok_dirs[0]), mbs=3)), 3)
    assert all(same_batch(x, y) for x, y in zip(a, b))


def error(cfg, n=1):
    """The ValueError raised while building a stream and reading n batches."""
    with pytest.raises(ValueError) as e:
        take(iter(stream(cfg)), n)
    return str(e.value)


def test_bad_rows_name_file_and_line(tok_dirs, tmp_path):
    good = sample_rows(4)
    # a row without a solution (other rows have the column)
    src = write_jsonl(tmp_path / "missing.jsonl", good[:2] + [{"prompt": "what is 1", "answer": "1"}] + good[2:])
    msg = error(text_config(src, tok_dirs[0]), 4)
    assert "missing.jsonl, line 3" in msg and "'solution'" in msg and "answer, prompt" in msg
    # no row has the column
    src = write_jsonl(tmp_path / "nocol.jsonl", [{"prompt": r["prompt"], "answer": r["solution"]} for r in good])
    msg = error(text_config(src, tok_dirs[0]))
    assert "nocol.jsonl, line 1" in msg and "'solution'" in msg and "answer, prompt" in msg
    # whitespace-only prompt
    src = write_jsonl(tmp_path / "empty.jsonl", good[:1] + [{"prompt": "   ", "solution": "1"}])
    msg = error(text_config(src, tok_dirs[0]), 2)
    assert "empty.jsonl, line 2" in msg and "empty prompt" in msg
    # empty solution in chat messages
    msgs = [{"role": "user", "content": "what is 1"}, {"role": "assistant", "content": ""}]
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    msg = error(text_config(src, tok_dirs[1], messages_field="messages"))
    assert "chat.jsonl, line 1" in msg and "empty solution" in msg
    # parquet rows are numbered too
    src = write_parquet(tmp_path / "bad.parquet", good[:3] + [{"prompt": "what", "solution": " "}])
    msg = error(text_config(src, tok_dirs[0]), 4)
    assert "bad.parquet, row 4" in msg and "empty solution" in msg


def test_bad_files_name_file_and_line(tok_dirs, tmp_path):
    lines = [(r'{"prompt": "what is %d", "solution": "%d"}' % (i, i)).encode() for i in range(5)]
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b"\n".join(lines[:3] + [b'{"prompt": "caf\xe9", "solution": "1"}'] + lines[3:]) + b"\n")
    with pytest.raises(ValueError, match=r"latin1\.jsonl, line 4: not valid UTF-8"):
        stream(text_config(str(bad), tok_dirs[0]))  # found before any streaming
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b"\n".join(lines[:2] + [b'{"prompt": "what", "solution": '] + lines[2:]) + b"\n")
    msg = error(text_config(str(broken), tok_dirs[0]))
    assert "broken.jsonl, line 3: invalid JSON" in msg
    with pytest.raises(ConfigError, match="text.source"):
        stream(text_config(str(tmp_path / "nothere.jsonl"), tok_dirs[0]))
    with pytest.raises(ConfigError, match="text.source"):
        stream(text_config(str(tmp_path / "none*.jsonl"), tok_dirs[0]))


@pytest.mark.parametrize("key,value", [("padding", "zeros"), ("overlong", "wrap"), ("max_length", 1),
                                       ("template", "{question}"), ("shuffle_buffer", -1)])
def test_bad_settings(tok_dirs, tmp_path, key, value):
    src = write_jsonl(tmp_path / "a.jsonl", sample_rows(2))
    with pytest.raises(ConfigError, match=f"text.{key}"):
        stream(text_config(src, tok_dirs[0], **{key: value}))
