"""Text-generation metrics (gen-PPL, entropy, MAUVE), the small scorer LM, scoring cells and the Table 2 layout.

Everything is offline: a WordLevel tokenizer over a fixed word list and a tiny random GPT-2 saved locally.
"""
import json
import math
import random

import pytest
import torch

from prism_ds.textgen import metrics, table
from prism_ds.textgen.samples import fill_cell

EOS = "<|endoftext|>"
WORDS_A = [f"a{i}" for i in range(20)]
WORDS_B = [f"b{i}" for i in range(20)]
VOCAB = [EOS, "<unk>"] + WORDS_A + WORDS_B
N_POSITIONS = 8  # short, so longer texts are scored in several windows


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a shared 2-core machine spinning threads cost several x."""
    try:
        import faiss
    except ImportError:  # the MAUVE tests then fail with metrics' "install the eval extra" message
        faiss = None
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    if faiss is not None:
        faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(before)
    if faiss is not None:
        faiss.omp_set_num_threads(before)


def build_tokenizer(directory):
    """GPT-2-like special tokens: <|endoftext|> is BOS, EOS and padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=EOS, eos_token=EOS, unk_token="<unk>",
                                  pad_token=EOS)
    tok.save_pretrained(str(directory))
    return tok


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A random 1-layer GPT-2 with its tokenizer in one folder: the scorer and the featuriser."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    build_tokenizer(folder)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(VOCAB), n_positions=N_POSITIONS, n_embd=32, n_layer=1,
                                       n_head=2, bos_token_id=0, eos_token_id=0))
    with torch.no_grad():  # B words in their own region of embedding space, as unrelated text is for a real LM
        direction = torch.randn(32)
        model.transformer.wte.weight[[VOCAB.index(w) for w in WORDS_B]] += 3 * direction / direction.norm()
    model.save_pretrained(folder)
    return folder, model.eval()


def sentences(words, n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def test_gen_ppl_equals_a_hand_computation(tiny_lm):
    folder, model = tiny_lm
    texts = ["a1 a2 a3", "b5 " * 17 + "a0", "a7", "a3 b3 a4 b4 a5 b5 a6 b6 a7 b7 a8"]  # 1 to 18 words
    out = metrics.generative_perplexity(texts, folder, batch_size=3)
    # By hand: [BOS] + word ids; token j is scored by -log softmax of the model's next-token logits given the
    # tokens from its window's start, windows of N_POSITIONS tokens overlapping by one (stride 7).
    total, count, per_sample = 0.0, 0, []
    with torch.no_grad():
        for text in texts:
            ids = [0] + [VOCAB.index(w) for w in text.split()]
            nll = 0.0
            for j in range(1, len(ids)):
                start = (j - 1) // (N_POSITIONS - 1) * (N_POSITIONS - 1)
                logits = model(torch.tensor([ids[start:j]])).logits[0, -1].double()
                nll += -torch.log_softmax(logits, -1)[ids[j]].item()
            per_sample.append(nll / (len(ids) - 1))
            total, count = total + nll, count + len(ids) - 1
    assert out["tokens"] == count == 3 + 18 + 1 + 11  # every word scored, the first one after BOS
    assert out["sample_tokens"] == [3, 18, 1, 11]
    assert out["gen_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert out["sample_nll"] == pytest.approx(per_sample, rel=1e-5)


def test_scorer_is_fp32_by_default_on_every_device_and_the_dtype_is_recorded(tiny_lm, tmp_path, monkeypatch):
    """MDLM, ReMDM and the PRISM authors score gen-PPL with fp32 weights; bf16 only when asked, and recorded."""
    from prism_ds.config import TextEvalConfig, load_config

    folder, _ = tiny_lm
    assert TextEvalConfig().scorer_dtype == "float32"
    assert load_config("owt_gpu").text_eval.scorer_dtype == "float32"
    texts = ["a1 a2 a3", "b5 b6 a0 a1 a2 a3 a4 a5 a6 a7 a8"]
    out = metrics.generative_perplexity(texts, folder)
    model = metrics._CACHE["scorer"][1]
    assert out["scorer_dtype"] == "float32" and all(p.dtype == torch.float32 for p in model.parameters())
    half = metrics.generative_perplexity(texts, folder, dtype="bfloat16")
    assert half["scorer_dtype"] == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in metrics._CACHE["scorer"][1].parameters())
    assert half["gen_ppl"] == pytest.approx(out["gen_ppl"], rel=0.05) and half["gen_ppl"] != out["gen_ppl"]
    # The default does not depend on the device (it used to be bf16 on CUDA): see what a GPU run would load.
    seen = {}

    def stop(name, role, setting, causal, device, dtype):
        seen.update(device=device.type, dtype=dtype)
        raise RuntimeError("stop before loading")

    with monkeypatch.context() as m:
        m.setattr(metrics, "_cached", stop)
        with pytest.raises(RuntimeError, match="stop before loading"):
            metrics.generative_perplexity(texts, folder, device="cuda")
    assert seen == {"device": "cuda", "dtype": torch.float32}
    # Scores record the dtype; a table refuses cells (or a data row) scored in another one.
    def make_batch(b, size):
        return [{"text": t} for t in sentences(WORDS_A, size, b)]

    path = fill_cell(tmp_path / "none_8.jsonl", {"policy": "none", "steps": 8, "seed": 0}, 6, 6, make_batch,
                     progress=False)
    fp32 = table.score_cell(path, folder)
    assert fp32["score_settings"]["scorer_dtype"] == "float32"
    other = fill_cell(tmp_path / "prism_8.jsonl", {"policy": "prism", "steps": 8, "seed": 0}, 6, 6, make_batch,
                      progress=False)
    bf16 = table.score_cell(other, folder, scorer_dtype="bfloat16")
    assert bf16["score_settings"]["scorer_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match=r"scored differently \(score\.scorer_dtype\)"):
        table.table2([fp32, bf16])
    data = table.score_references(sentences(WORDS_A, 5, 1), folder, tmp_path / "data.json", scorer_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"\(data row\) .* scored differently \(score\.scorer_dtype\)"):
        table.table2([data, fp32])
    assert "gen-PPL under " + str(folder) + " (float32)" in table.table2([fp32])


@pytest.mark.parametrize("value", ["float16", "fp32", "bf16"])
def test_a_bad_scorer_dtype_is_named(value, tmp_path):
    from prism_ds.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"text_eval\.scorer_dtype='{value}': expected float32 or bfloat16"):
        load_config("owt_gpu", [f"text_eval.scorer_dtype={value}"])
    with pytest.raises(ConfigError, match=rf"text_eval\.scorer_dtype='{value}': expected one of float32, bfloat16"):
        metrics.generative_perplexity(["a1"], tmp_path, dtype=value)


def test_entropy():
    assert metrics.unigram_entropy([7] * 50) == 0.0
    assert metrics.unigram_entropy(list(range(13)) * 4) == pytest.approx(math.log(13))
    assert metrics.unigram_entropy([1, 1, 2]) == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    assert metrics.mean_entropy([[3, 3], [1, 2]]) == pytest.approx(math.log(2) / 2)


def test_mauve_same_set_is_one_and_unrelated_text_is_lower(tiny_lm):
    folder, _ = tiny_lm
    p = sentences(WORDS_A, 60, 0)
    same = metrics.mauve_score(p, p, folder, batch_size=16)
    other = metrics.mauve_score(p, sentences(WORDS_B, 60, 1), folder, batch_size=16)
    fresh = metrics.mauve_score(p, sentences(WORDS_A, 60, 7), folder, batch_size=16)  # new draws, same source
    assert same == pytest.approx(1.0, abs=1e-3)
    assert other < 0.1 < 0.8 < fresh


def test_featurizer_follows_mauve_convention(tiny_lm):
    """Final-layer hidden state of the last token, the same padded in a batch as alone."""
    folder, model = tiny_lm
    texts = ["a1 a2 a3 a4", "b1 b2 b3"]
    feats = metrics.featurize(texts, folder, batch_size=2)
    with torch.no_grad():
        alone = model.transformer(torch.tensor([[VOCAB.index(w) for w in texts[1].split()]])).last_hidden_state
    assert feats.shape == (2, 32)
    assert torch.allclose(torch.from_numpy(feats[1]), alone[0, -1], atol=1e-5)


def test_missing_featurizer_gives_a_clear_error(tmp_path):
    with pytest.raises(metrics.ModelUnavailableError,
                       match=r"featurizer model .*no such folder.*huggingface-cli download gpt2-large --local-dir DIR"
                             r".*text_eval\.featurizer=DIR"):
        metrics.mauve_score(["a"], ["b"], tmp_path / "gpt2-large")
    (tmp_path / "empty").mkdir()
    with pytest.raises(metrics.ModelUnavailableError, match="no config.json"):
        metrics.generative_perplexity(["a1"], tmp_path / "empty")


def test_scorer_lm_trains_and_is_reused(tmp_path, monkeypatch):
    from helpers import read_scalars

    from prism_ds.textgen.scorer_lm import train_causal_lm

    tokdir = tmp_path / "tok"
    build_tokenizer(tokdir)
    corpus = tmp_path / "train.jsonl"
    # Highly regular documents: a0 a1 a2 ... in order, so a tiny model learns them in a few steps.
    docs = [" ".join(WORDS_A[(s + k) % 20] for k in range(10)) for s in range(40)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    kw = dict(n_layer=1, n_embd=32, n_head=2, seq_len=16, steps=60, batch_size=8, lr=3e-3, progress=False)
    out = train_causal_lm(corpus, tokdir, tmp_path / "scorer", **kw)
    marker = json.loads((out / "scorer_settings.json").read_text())
    loss = read_scalars(out / "tb")["scorer/train_loss"]
    assert loss[-1] < loss[0] - 1.0
    assert marker["val_loss"] < math.log(len(VOCAB)) - 1.0
    # It serves as a scorer: in-distribution text scores far better than shuffled text.
    good = metrics.generative_perplexity(docs[:5], out)["gen_ppl"]
    bad = metrics.generative_perplexity(sentences(WORDS_A, 5, 3), out)["gen_ppl"]
    assert good < bad / 2
    monkeypatch.setattr("transformers.GPT2LMHeadModel.__init__", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("retrained")))
    assert train_causal_lm(corpus, tokdir, tmp_path / "scorer", **kw) == out
    with pytest.raises(ValueError, match="other settings \\(steps differ\\)"):
        train_causal_lm(corpus, tokdir, tmp_path / "scorer", **{**kw, "steps": 61})


def _cell(policy, steps, mauve, ppl, ent, samples=None, **settings):
    return {"samples": samples or f"{policy}_{steps}.jsonl", "policy": policy, "steps": steps, "n": 100,
            "settings": {"policy": policy, "steps": steps, "seed": 0, "model": "m", **settings},
            "score_settings": {"scorer": "gpt2-large", "scorer_id": "gpt2-large", "featurizer": "gpt2-large",
                               "references": "r", "n_references": 100},
            "mauve": mauve, "gen_ppl": ppl, "entropy": ent}


def test_table2_layout():
    data = {"samples": "refs.json", "policy": "data", "steps": None, "n": 100, "mauve": 1.0, "gen_ppl": 14.8,
            "entropy": 5.44, "settings": None, "score_settings": {"scorer": "gpt2-large", "scorer_id": "gpt2-large",
                                                                  "references": "r"}}
    cells = [_cell("none", 32, 0.006, 100.5, 5.6), _cell("prism", 16, 0.0061, 76.14, 5.221),
             _cell("none", 16, 0.002, 230.2, 5.71), _cell("prism", 32, None, 33.6, 5.19)]
    assert table.table2([data] + cells) == "\n".join([
        "Cells: MAUVE ↑ / gen-PPL ↓ / entropy ↑ (nats), 100 samples per cell; gen-PPL under gpt2-large; "
        "MAUVE with gpt2-large features against 100 human texts.",
        "",
        "| policy | N = 16 | N = 32 |",
        "|---|---|---|",
        "| data | 1.00 / 14.8 / 5.44 | 1.00 / 14.8 / 5.44 |",
        "| none | 0.002 / 230.2 / 5.71 | 0.006 / 100.5 / 5.60 |",
        "| prism | **0.006** / 76.1 / 5.22 | — / 33.6 / 5.19 |",
    ])


def test_table2_refuses_to_mix_settings():
    a, b = _cell("none", 16, 0.1, 10.0, 5.0), _cell("prism", 16, 0.2, 9.0, 5.0, samples="x.jsonl", seed=1)
    with pytest.raises(ValueError, match=r"none_16\.jsonl and x\.jsonl were sampled with different settings \(seed\)"):
        table.table2([a, b])
    c = _cell("prism", 16, 0.2, 9.0, 5.0)
    c["score_settings"] = {**c["score_settings"], "scorer": "other"}
    with pytest.raises(ValueError, match=r"scored differently \(score\.scorer\)"):
        table.table2([a, c])
    with pytest.raises(ValueError, match="the same cell"):
        table.table2([a, _cell("none", 16, 0.3, 9.0, 5.0, samples="y.jsonl")])


def test_score_cell_is_cached_on_the_samples_content(tiny_lm, tmp_path, monkeypatch):
    folder, _ = tiny_lm
    refs = sentences(WORDS_A, 40, 5)

    def make_batch(b, size):
        texts = sentences(WORDS_A if b % 2 else WORDS_B, size, b)
        return [{"tokens": [VOCAB.index(w) for w in t.split()], "text": t} for t in texts]

    settings = {"policy": "prism", "steps": 8, "seed": 0}
    path = fill_cell(tmp_path / "prism_8.jsonl", settings, 40, 10, make_batch, progress=False)
    first = table.score_cell(path, folder, folder, refs, scorer_batch_size=16, featurizer_batch_size=16)
    assert 0 < first["mauve"] < 1 and first["gen_ppl"] > 1 and first["n"] == 40
    assert first["entropy"] == pytest.approx(metrics.mean_entropy(
        [r["tokens"] for b in range(4) for r in make_batch(b, 10)]))
    assert (tmp_path / "prism_8.jsonl.scores.json").exists()
    assert len(list(tmp_path.glob("mauve_references_*.npy"))) == 1
    with monkeypatch.context() as m:  # unchanged samples and scoring: nothing is recomputed
        m.setattr(metrics, "generative_perplexity", lambda *a, **k: pytest.fail("recomputed"))
        assert table.score_cell(path, folder, folder, refs) == first
    path.write_text(path.read_text().replace("a1", "a2"))  # other samples: scored again
    assert table.score_cell(path, folder, folder, refs)["gen_ppl"] != first["gen_ppl"]
    data = table.score_references(refs, folder, tmp_path / "data.json")
    assert data["mauve"] == 1.0 and data["policy"] == "data"
    text = table.table2([data, table.score_cell(path, folder)])
    assert "| data | 1.00 / " in text and "| prism | — / " in text
