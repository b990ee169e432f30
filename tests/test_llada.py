"""LLaDA: the official layout (names, shapes, special tokens, chat template), the architecture facts on
hand-checked cases, loading errors, LoRA, and the generic Hugging Face backbone interface."""
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from helpers import LLADA_REFERENCE
from prism_ds.config import ConfigError, LoraConfig, ModelConfig, TextDataConfig
from prism_ds.models.llada import LLaDAConfig, LLaDAModelLM, RMSNorm, apply_rope, rope_tables
from prism_ds.models.loading import add_lora, load_pretrained, mask_token_id
from prism_ds.models.tiny_llada import jsonl_corpus, write_tiny_llada
from prism_ds.text.tokenizer import load_tokenizer

needs_reference = pytest.mark.skipif(not LLADA_REFERENCE.exists(), reason=f"{LLADA_REFERENCE} not present")


@needs_reference
def test_8b_model_from_the_official_config_has_exactly_the_checkpoints_names_and_sizes():
    config = LLaDAConfig.from_pretrained(str(LLADA_REFERENCE))
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    index = json.loads((LLADA_REFERENCE / "model.safetensors.index.json").read_text())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(shapes) == set(index["weight_map"])  # nothing missing, nothing extra
    d, ff, vocab = 4096, 12288, 126464
    assert shapes["model.transformer.wte.weight"] == (vocab, d) and shapes["model.transformer.ff_out.weight"] == (vocab, d)
    assert shapes["model.transformer.blocks.7.q_proj.weight"] == (d, d)
    assert shapes["model.transformer.blocks.7.ff_proj.weight"] == (ff, d)
    assert shapes["model.transformer.blocks.7.ff_out.weight"] == (d, ff)
    # bf16 bytes of every weight = the index's total_size: every shape is right, not only the names.
    assert sum(math.prod(s) for s in shapes.values()) * 2 == index["metadata"]["total_size"]
    assert mask_token_id(LLADA_REFERENCE) == 126336  # the official tokenizer has no mask_token


@needs_reference
def test_tiny_tokenizer_carries_the_official_special_tokens_and_chat_template(tiny_llada):
    from transformers import AutoTokenizer

    official = json.loads((LLADA_REFERENCE / "tokenizer_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(tiny_llada))
    added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                      "single_word": t.single_word, "special": t.special} for i, t in tok.added_tokens_decoder.items()}
    assert added == official["added_tokens_decoder"]
    assert tok.chat_template == official["chat_template"]
    for key in ("bos_token", "eos_token", "pad_token", "cls_token"):
        assert getattr(tok, key) == official[key], key
    assert len(tok) == 126349 and tok.mask_token_id is None  # as the real tokenizer: the mask is an added token
    assert mask_token_id(tiny_llada, tok) == 126336
    # The chat-templated prompt starts with exactly one BOS and ends with the assistant header.
    text = tok.apply_chat_template([{"role": "user", "content": "Add two numbers."}], add_generation_prompt=True,
                                   tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [126080, 126346] and ids.count(126080) == 1
    last_header = len(ids) - 1 - ids[::-1].index(126346)
    assert tok.decode(ids[last_header:]) == "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_rope_pairs_dimension_i_with_i_plus_half_in_fp32():
    """head_dim 4, theta 100: frequencies (1, 0.1); position 2 rotates (x0, x2) by 2 rad and (x1, x3) by 0.2 rad."""
    cos, sin = rope_tables(torch.arange(3), head_dim=4, theta=100.0)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4).expand(1, 1, 3, 4).to(torch.bfloat16)
    out = apply_rope(x, cos, sin)
    assert out.dtype == torch.bfloat16
    a, b = 2.0, 0.2
    want = torch.tensor([1 * math.cos(a) - 3 * math.sin(a), 2 * math.cos(b) - 4 * math.sin(b),
                         3 * math.cos(a) + 1 * math.sin(a), 4 * math.cos(b) + 2 * math.sin(b)])
    assert torch.allclose(out[0, 0, 2].float(), want.to(torch.bfloat16).float())
    assert torch.equal(out[0, 0, 0], x[0, 0, 0])  # position 0 is the identity
    # Applied in fp32: rotating in bf16 (cos/sin and products rounded) gives different numbers.
    q = torch.randn(1, 2, 64, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    cos, sin = rope_tables(torch.arange(64), 128, 500000.0)
    half = lambda t: torch.cat((-t[..., 64:], t[..., :64]), -1)  # noqa: E731
    in_bf16 = q * cos.to(torch.bfloat16) + half(q) * sin.to(torch.bfloat16)
    in_fp32 = (q.float() * cos + half(q.float()) * sin).to(torch.bfloat16)
    assert torch.equal(apply_rope(q, cos, sin), in_fp32) and not torch.equal(in_fp32, in_bf16)


def test_rmsnorm_normalises_in_fp32_then_casts_then_scales():
    norm = RMSNorm(4, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0]))
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0]])  # mean square 6.25 -> rsqrt 0.4
    assert torch.allclose(norm(x), torch.tensor([[1.2, 3.2, 0.0, 0.0]]), atol=1e-5)
    xb = (torch.randn(8, 256, generator=torch.Generator().manual_seed(1)) * 30).to(torch.bfloat16)
    normb = RMSNorm(256, 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        normb.weight.copy_(torch.linspace(0.5, 1.5, 256))
    want = (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16) * normb.weight
    low = (xb * torch.rsqrt(xb.pow(2).mean(-1, keepdim=True) + 1e-5)) * normb.weight  # all in bf16
    assert torch.equal(normb(xb), want) and not torch.equal(want, low)


def _reference_logits(model: LLaDAModelLM, ids: torch.Tensor) -> torch.Tensor:
    """The LLaDA forward written out from the architecture facts, with plain tensor operations."""
    cfg, sd = model.config, model.state_dict()
    hd = cfg.d_model // cfg.n_heads

    def rms(x, w):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)).to(x.dtype) * w

    inv = cfg.rope_theta ** (-torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(ids.shape[1]).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)

    def rope(t):
        return t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin

    x = sd["model.transformer.wte.weight"][ids]
    B, L = ids.shape
    for i in range(cfg.n_layers):
        p = lambda n: sd[f"model.transformer.blocks.{i}.{n}.weight"]  # noqa: E731
        h = rms(x, p("attn_norm"))
        q = (h @ p("q_proj").T).view(B, L, cfg.n_heads, hd).transpose(1, 2)
        k = (h @ p("k_proj").T).view(B, L, cfg.n_kv_heads, hd).transpose(1, 2)
        v = (h @ p("v_proj").T).view(B, L, cfg.n_kv_heads, hd).transpose(1, 2)
        g = cfg.n_heads // cfg.n_kv_heads
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        att = (rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd)).softmax(-1)  # bidirectional: no mask
        x = x + (att @ v).transpose(1, 2).reshape(B, L, -1) @ p("attn_out").T
        m = rms(x, p("ff_norm"))
        x = x + (F.silu(m @ p("ff_proj").T) * (m @ p("up_proj").T)) @ p("ff_out").T
    return rms(x, sd["model.transformer.ln_f.weight"]) @ sd["model.transformer.ff_out.weight"].T


def test_forward_equals_the_architecture_written_out_with_grouped_kv_heads():
    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48, vocab_size=50,
                      embedding_size=64, mask_token_id=49, rope_theta=10000.0)
    model = LLaDAModelLM(cfg).eval()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        out = model(ids)
        assert torch.allclose(out.logits, _reference_logits(model, ids), atol=1e-5)
        assert model(ids, return_logits=False).logits is None
        cols = torch.tensor([2, 5, 6])  # a sampler's block: only those positions are projected to the vocabulary
        assert torch.allclose(model(ids, logits_cols=cols).logits, out.logits[:, cols], atol=1e-6)
        assert torch.allclose(out.last_hidden_state @ model.model.transformer.ff_out.weight.T, out.logits, atol=1e-6)


def test_a_padding_mask_hides_padded_keys_and_no_mask_attends_everywhere():
    torch.manual_seed(1)
    model = LLaDAModelLM(LLaDAConfig(d_model=32, n_heads=4, n_layers=1, mlp_hidden_size=48, vocab_size=50,
                                     embedding_size=50, mask_token_id=49)).eval()
    ids = torch.randint(0, 50, (1, 6))
    padded = torch.cat([torch.full((1, 3), 7), ids], 1)  # left padding, as when batching prompts
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], 1).long()
    with torch.no_grad():
        alone = model(ids).logits
        masked = model(padded, attention_mask=mask).logits[:, 3:]
        unmasked = model(padded).logits[:, 3:]
    # RoPE is relative, so the shifted positions do not matter once padded keys are hidden.
    assert torch.allclose(masked, alone, atol=1e-5) and not torch.allclose(unmasked, alone, atol=1e-3)


def test_folder_problems_are_named(tmp_path, tiny_llada):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_llada, folder)
    cfg = ModelConfig(kind="llada", path=str(folder))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (folder / shard).rename(folder / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match=f"missing: {shard}"):
        load_pretrained(cfg)
    (folder / "moved.safetensors").rename(folder / shard)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mlp_hidden_size": 96}))
    with pytest.raises(ValueError, match=r"safetensors: model.transformer.blocks.0.ff_\w+.weight has shape \(\d+, \d+\) but config.json implies"):
        load_pretrained(cfg)
    (folder / "config.json").write_text(json.dumps({**config, "alibi": True}))
    with pytest.raises(ValueError, match="config.json: alibi=True is not supported"):
        load_pretrained(cfg)
    (folder / "config.json").write_text(json.dumps({**config, "mask_token_id": None}))
    assert mask_token_id(folder, type("Tok", (), {"mask_token_id": None, "get_vocab": lambda self: {
        "<|mdm_mask|>": 5}})()) == 5
    with pytest.raises(ConfigError, match="no mask_token_id, and the tokenizer has neither"):
        mask_token_id(folder, type("Tok", (), {"mask_token_id": None, "get_vocab": lambda self: {}})())
    with pytest.raises(ConfigError, match="model.path='nowhere': not a directory"):
        load_pretrained(ModelConfig(kind="llada", path="nowhere"))


def test_lora_targets_q_k_v_and_a_missing_target_is_named(tiny_llada):
    model = load_pretrained(ModelConfig(kind="llada", path=str(tiny_llada)))
    lora = add_lora(model, LoraConfig(r=4, alpha=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "k_proj", "v_proj"}  # ...q_proj.lora_A.default.weight
    with pytest.raises(ConfigError, match=r"lora.target_modules: \['qkv'\] not found"):
        add_lora(load_pretrained(ModelConfig(kind="llada", path=str(tiny_llada))), LoraConfig(r=4, target_modules=["qkv"]))


def test_any_hf_model_with_logits_and_hidden_states_is_a_backbone(tmp_path):
    """A folder with its own modeling code (auto_map, trust_remote_code) serves through the same interface."""
    from prism_ds.models.loading import load_model

    (tmp_path / "modeling_toy.py").write_text('''
import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

class ToyConfig(PretrainedConfig):
    model_type = "toy_mdm"
    def __init__(self, vocab_size=20, hidden_size=16, **kw):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        super().__init__(**kw)

class ToyMDM(PreTrainedModel):
    config_class = ToyConfig
    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.out = torch.nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()
    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **kw):
        h = self.embed(input_ids)
        return MaskedLMOutput(logits=self.out(h), hidden_states=(h, h.tanh()) if output_hidden_states else None)
''')
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "toy_mdm", "vocab_size": 20, "hidden_size": 16, "architectures": ["ToyMDM"],
        "auto_map": {"AutoConfig": "modeling_toy.ToyConfig", "AutoModel": "modeling_toy.ToyMDM"}}))
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        from modeling_toy import ToyConfig, ToyMDM

        ToyMDM(ToyConfig()).save_pretrained(str(tmp_path / "weights"))
        shutil.copy(tmp_path / "weights" / "model.safetensors", tmp_path / "model.safetensors")
        with pytest.raises(ConfigError, match="model_type='toy_mdm' has no prism-ds implementation"):
            load_model(tmp_path)
        model, cfg = load_model(tmp_path, trust_remote_code=True)
    finally:
        sys.path.remove(str(tmp_path))
    ids = torch.randint(0, 20, (2, 5))
    out = model.backbone(ids)
    assert out.logits.shape == (2, 5, 20) and out.last_hidden.shape == (2, 5, 16)
    assert torch.allclose(out.last_hidden, model.backbone.model.embed(ids).tanh())  # the last hidden state
    from prism_ds.models.quality_heads import build_quality_head

    head = build_quality_head("projection+linear", 16, None)
    assert head(out).shape == (2, 5) and cfg.model.kind == "hf"


def test_activation_checkpointing_recomputes_each_block_in_backward(tiny_llada):
    from prism_ds.models.llada import LLaDABlock

    model = load_pretrained(ModelConfig(kind="llada", path=str(tiny_llada), gradient_checkpointing=True)).train()
    lora = add_lora(model, LoraConfig(r=4, alpha=4))
    calls = []
    for block in model.model.transformer.blocks:
        block.attn_norm.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, 1000, (1, 12))
    loss = lora(input_ids=ids).logits.float().logsumexp(-1).mean()
    assert len(calls) == 2
    loss.backward()
    assert len(calls) == 4  # each block ran again in backward
    assert all(p.grad is not None for n, p in lora.named_parameters() if p.requires_grad)
    assert isinstance(model.model.transformer.blocks[0], LLaDABlock)


def test_a_compact_tiny_llada_from_a_jsonl_corpus_keeps_the_special_tokens_consistent(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    rows = [{"text": f"Write a function f{i}.", "code": f"def f{i}(x):\n    return x + {i}\n", "task_id": i}
            for i in range(50)]
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    texts = jsonl_corpus(corpus)
    assert len(texts) == 100  # the string fields only
    folder = write_tiny_llada(tmp_path / "model", compact=True, corpus=texts)
    config = json.loads((folder / "config.json").read_text())
    tok = load_tokenizer(TextDataConfig(tokenizer=str(folder)))
    assert config["vocab_size"] < 4096 and config["vocab_size"] >= len(tok)
    assert tok.convert_tokens_to_ids("<|mdm_mask|>") == config["mask_token_id"] == mask_token_id(str(folder), tok)
    assert tok.convert_tokens_to_ids("<|eot_id|>") < config["vocab_size"]
    assert tok.eos_token_id == config["eos_token_id"]
    corpus.write_text(json.dumps(rows[0]) + "\nnot json\n")
    with pytest.raises(ValueError, match=r"corpus.jsonl, line 2: not a JSON object"):
        jsonl_corpus(corpus)
    with pytest.raises(FileNotFoundError, match="--corpus .*missing.jsonl: no such file"):
        jsonl_corpus(tmp_path / "missing.jsonl")
