"""prism.mask_window: only the first W answer positions of a row are ever masked (the PRISM authors' LLaDA
collator), later answer and EOS-pad positions stay clean context, and the MDM normaliser is min(answer, W)."""
import pytest
import torch

from helpers import SPECIALS, WORDS, build_tokenizer, sample_rows, text_config, write_jsonl
from prism_ds.config import ConfigError, RunConfig
from prism_ds.core import masking
from prism_ds.engine.data_source import build_task
from prism_ds.text.prompt_data import PromptSolutionStream

MASK_ID = -1


def authors_maskable(prompt_len: torch.Tensor, L: int, window: int) -> torch.Tensor:
    """The authors' rule, written out: valid = every position after the prompt (pads included), then only
    those whose running count of valid positions is <= window."""
    valid = torch.arange(L)[None] >= prompt_len[:, None]
    return valid & (valid.cumsum(-1) <= window)


def _task(tmp_path, window, **text):
    rows = sample_rows(6)
    tok = build_tokenizer(tmp_path / "tok")
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = RunConfig()
    cfg.task, cfg.prism.mask_window = "text", window
    cfg.text = text_config(src, tok, heldout_source=src, **text)
    # The fixture tokenizer has one token per word and no chat template: BOS + the prompt's words.
    prompt_len = torch.tensor([1 + len(r["prompt"].split()) for r in rows])
    return build_task(cfg, 3, 0, 1), prompt_len


def _ever_masked(batch, monkeypatch):
    """Positions masked at t = 1 with eps = 0, i.e. every position the forward process may ever mask."""
    monkeypatch.setattr(masking, "sample_times", lambda n, *a, **k: torch.ones(n))
    return masking.mask_tokens(batch.x, batch.fixed, MASK_ID, eps=0.0).masked


@pytest.mark.parametrize("window", [5, 3])
def test_only_the_first_window_answer_positions_are_maskable(tmp_path, monkeypatch, window):
    L = 16  # prompts of 10-13 tokens: answers (with EOS pads) of 3-6 positions, some shorter than the window
    task, prompt_len = _task(tmp_path, window, max_length=L)
    batches = [task.source.next_batch(), task.source.next_batch()]
    assert len(set(prompt_len.tolist())) > 1
    for i, batch in enumerate(batches):
        plen = prompt_len[3 * i:3 * i + 3]
        assert _ever_masked(batch, monkeypatch).equal(authors_maskable(plen, L, window))
        assert batch.lengths.tolist() == torch.clamp(L - plen, max=window).float().tolist()
    # The held-out batch (validation loss, calibration) is windowed the same way.
    held = task.heldout
    assert _ever_masked(held, monkeypatch).equal(authors_maskable(prompt_len, L, window))
    assert held.lengths.tolist() == torch.clamp(L - prompt_len, max=window).float().tolist()
    assert task.maskable == window  # bounds prism.k


def test_bucket_padding_normalises_by_the_window_or_the_shorter_answer(tmp_path, monkeypatch):
    window = 6
    task, prompt_len = _task(tmp_path / "b", window, max_length=24, padding="bucket", bucket_pool=2)
    answers = []
    for _ in range(2):
        batch = task.source.next_batch()
        width = batch.x.shape[1]
        # Buckets reorder rows: each prompt carries its row index right after BOS and "question".
        plen = prompt_len[[int(WORDS[int(t) - len(SPECIALS)]) for t in batch.x[:, 2]]]
        assert _ever_masked(batch, monkeypatch).equal(authors_maskable(plen, width, window))
        assert batch.lengths.tolist() == torch.clamp(width - plen, max=window).float().tolist()
        answers += (width - plen).tolist()
    assert min(answers) < window < max(answers)  # both cases: an answer shorter and one longer than the window


def test_mask_window_zero_or_wider_than_every_answer_changes_nothing(tmp_path):
    plain, _ = _task(tmp_path / "zero", 0, max_length=24)
    wide, _ = _task(tmp_path / "wide", 24, max_length=24)
    for _ in range(2):
        a, b = plain.source.next_batch(), wide.source.next_batch()
        assert a.x.equal(b.x) and a.fixed.equal(b.fixed) and a.lengths.equal(b.lengths)
    assert plain.heldout.fixed.equal(wide.heldout.fixed) and plain.heldout.lengths.equal(wide.heldout.lengths)
    # and with 0 the batch is the stream's own: the prompt fixed, normalised by the whole answer
    stream = plain.source.stream
    own = next(iter(PromptSolutionStream(stream.cfg, stream.tokenizer, 3)))
    first = _task(tmp_path / "again", 0, max_length=24)[0].source.next_batch()
    assert first.fixed.equal(own.fixed) and first.lengths.equal(own.answer_len.float())


def test_bad_mask_window_is_named(tmp_path):
    with pytest.raises(ConfigError, match="prism.mask_window=-1: must be >= 0"):
        _task(tmp_path, -1)
    cfg = RunConfig()
    cfg.prism.mask_window = 512  # task=sudoku
    with pytest.raises(ConfigError, match="prism.mask_window=512: .*task=text only .* not task=sudoku"):
        build_task(cfg, 4, 0, 1)
