"""MDLM compatibility: the DiT equals an independent functional reference of MDLM's architecture, and released-format
folders and Lightning checkpoints (written here in the published layout) load through prism_ds.load_model."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from prism_ds import load_model
from prism_ds.models.dit import DiT

VOCAB, HIDDEN, BLOCKS, HEADS, COND = 23, 16, 2, 2, 8
MASK = VOCAB - 1


def _randomised(seed: int = 0) -> DiT:
    """A DiT whose every weight is random (the zero-initialised adaLN and output layers too, so nothing hides)."""
    torch.manual_seed(seed)
    model = DiT(VOCAB, HIDDEN, BLOCKS, HEADS, COND, dropout=0.0, mask_id=MASK).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" not in name else 0.1) + (1.0 if "norm" in name else 0.0))
    return model


def _reference(sd: dict, tokens: torch.Tensor) -> torch.Tensor:
    """MDLM's DIT forward and SUBS, written out from the facts in ../shared/reference/prism-notes.md."""
    B, L = tokens.shape
    H, hd = HIDDEN, HIDDEN // HEADS
    x = sd["vocab_embed.embedding"][tokens]
    freqs = torch.exp(-math.log(10_000) * torch.arange(128, dtype=torch.float32) / 128)
    feat = torch.cat([torch.cos(0.0 * freqs), torch.sin(0.0 * freqs)])[None].expand(B, -1)  # sigma = 0
    c = F.linear(F.silu(F.linear(feat, sd["sigma_map.mlp.0.weight"], sd["sigma_map.mlp.0.bias"])),
                 sd["sigma_map.mlp.2.weight"], sd["sigma_map.mlp.2.bias"])
    c = F.silu(c)
    inv = 1.0 / (10_000 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.outer(torch.arange(L).float(), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rot(t):  # t [B, L, heads, hd]; dimension i pairs with i + hd/2
        half = torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1)
        return t * cos[None, :, None] + half * sin[None, :, None]

    def norm(t, w):
        return F.layer_norm(t, [H]) * w

    for i in range(BLOCKS):
        p = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        mod = F.linear(c, p("adaLN_modulation.weight"), p("adaLN_modulation.bias"))[:, None]
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = mod.chunk(6, -1)
        h = norm(x, p("norm1.weight")) * (1 + sc_a) + sh_a
        qkv = (h @ p("attn_qkv.weight").T).view(B, L, 3, HEADS, hd)
        q, k, v = rot(qkv[:, :, 0]), rot(qkv[:, :, 1]), qkv[:, :, 2]
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        o = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(B, L, H)
        x = x + g_a * (o @ p("attn_out.weight").T)
        h = norm(x, p("norm2.weight")) * (1 + sc_m) + sh_m
        mlp = F.linear(F.gelu(F.linear(h, p("mlp.0.weight"), p("mlp.0.bias")), approximate="tanh"),
                       p("mlp.2.weight"), p("mlp.2.bias"))
        x = x + g_m * mlp
    sh, sc = F.linear(c, sd["output_layer.adaLN_modulation.weight"], sd["output_layer.adaLN_modulation.bias"])[
        :, None].chunk(2, -1)
    logits = F.linear(norm(x, sd["output_layer.norm_final.weight"]) * (1 + sc) + sh, sd["output_layer.linear.weight"],
                      sd["output_layer.linear.bias"])
    logits[..., MASK] += -1e6
    logits = logits - logits.logsumexp(-1, keepdim=True)
    unmasked = tokens != MASK
    logits[unmasked] = -1e6
    logits[unmasked.nonzero(as_tuple=True) + (tokens[unmasked],)] = 0.0
    return logits


def _tokens(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, VOCAB - 1, (3, 12), generator=g)
    return t.masked_fill(torch.rand(t.shape, generator=g) < 0.5, MASK)


def test_dit_equals_the_reference_architecture_with_subs():
    model = _randomised()
    tokens = _tokens()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    ours = model(tokens).logits
    ref = _reference(sd, tokens)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    # SUBS: the mask is never predicted, a clean position copies its token
    assert (ours[..., MASK] < -1e5).all()
    clean = tokens != MASK
    assert (ours[clean].argmax(-1) == tokens[clean]).all()


def test_parameter_order_is_mdlms():
    """MDLM's EMA weights are a list in parameters() order; ours must register modules in the same order."""
    names = [n for n, _ in _randomised().named_parameters()]
    assert names[:5] == ["vocab_embed.embedding", "sigma_map.mlp.0.weight", "sigma_map.mlp.0.bias",
                         "sigma_map.mlp.2.weight", "sigma_map.mlp.2.bias"]
    assert names[5:15] == [f"blocks.0.{n}" for n in ("norm1.weight", "attn_qkv.weight", "attn_out.weight", "norm2.weight",
                                                     "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                                                     "adaLN_modulation.weight", "adaLN_modulation.bias")]
    assert names[-5:] == ["output_layer.norm_final.weight", "output_layer.linear.weight", "output_layer.linear.bias",
                          "output_layer.adaLN_modulation.weight", "output_layer.adaLN_modulation.bias"]


def _write_folder(directory, model: DiT, extra: dict | None = None, drop: str | None = None):
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "mdlm", "architectures": ["MDLM"], "vocab_size": VOCAB, "model_length": 12,
              "hidden_dim": HIDDEN, "cond_dim": COND, "n_blocks": BLOCKS, "n_heads": HEADS, "dropout": 0.1,
              "time_conditioning": False}
    (directory / "config.json").write_text(json.dumps(config))
    state = {f"backbone.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != drop}
    state.update(extra or {})
    save_file(state, str(directory / "model.safetensors"))
    return directory


def test_published_folder_loads_with_the_same_logits(tmp_path):
    model = _randomised()
    folder = _write_folder(tmp_path / "mdlm-owt", model)
    loaded, cfg = load_model(folder)
    assert cfg.model.kind == "mdlm" and loaded.quality_head is None
    tokens = _tokens()
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_missing_or_unknown_weight_is_named(tmp_path):
    model = _randomised()
    with pytest.raises(ValueError, match=r"missing \['backbone.blocks.1.attn_out.weight'\]"):
        load_model(_write_folder(tmp_path / "a", model, drop="blocks.1.attn_out.weight"))
    with pytest.raises(ValueError, match="unexpected.*backbone.blocks.0.attn.extra"):
        load_model(_write_folder(tmp_path / "b", model, extra={"backbone.blocks.0.attn.extra": torch.zeros(2)}))


def test_folder_of_another_architecture_is_refused(tmp_path):
    from prism_ds.models.mdlm import read_checkpoint

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2', not an MDLM checkpoint"):
        read_checkpoint(tmp_path)


class LightningHparams:  # stands in for the OmegaConf config a real .ckpt pickles; never importable at load time
    def __init__(self):
        self.model = {"hidden_size": HIDDEN}


def test_lightning_ckpt_loads_its_ema_weights(tmp_path):
    trained, ema = _randomised(0), _randomised(1)
    ckpt = {"state_dict": {f"backbone.{k}": v for k, v in trained.state_dict().items()},
            "ema": {"decay": 0.9999, "num_updates": 10, "shadow_params": [p.detach() for p in ema.parameters()]},
            "hyper_parameters": {"config": LightningHparams()}, "pytorch-lightning_version": "2.2.1"}
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    tokens = _tokens()
    loaded, _ = load_model(path)
    assert torch.equal(loaded(tokens).logits, ema(tokens).logits)  # EMA weights by default
    from prism_ds.models import mdlm

    plain = DiT(VOCAB, HIDDEN, BLOCKS, HEADS, COND, dropout=0.0, mask_id=MASK).eval()
    mdlm.load_into(plain, path, use_ema=False)
    assert torch.equal(plain(tokens).logits, trained(tokens).logits)


def test_tokenizer_that_does_not_match_the_checkpoint_is_refused(tmp_path):
    from prism_ds.models.mdlm import vocab_and_mask

    folder = _write_folder(tmp_path / "m", _randomised())

    class Tok:
        mask_token_id = None

        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    assert vocab_and_mask(folder, Tok(VOCAB - 1)) == (VOCAB, VOCAB - 1)  # GPT-2 style: mask appended last
    with pytest.raises(ValueError, match="tokenizer and checkpoint do not match"):
        vocab_and_mask(folder, Tok(VOCAB + 5))


def test_attention_head_is_the_papers_size_and_starts_at_one_half():
    from prism_ds.models.quality_heads import build_quality_head

    head = build_quality_head("attention+linear", 768, 128, n_heads=12)
    n = sum(p.numel() for p in head.parameters())
    assert 7.5e6 < n < 8.2e6, n  # the paper's "~7.9M"
    assert head.per_token is False
    small = build_quality_head("attention+linear", HIDDEN, COND, n_heads=HEADS)
    out = _randomised()(_tokens())
    assert torch.allclose(small(out), torch.zeros(3, 12))  # zero-init final layer: g = 0.5 everywhere
    with pytest.raises(ValueError, match="attention\\+linear"):
        build_quality_head("attention+linear", 64, None)


def test_training_mode_logits_give_the_same_loss_as_full_subs():
    """In training only SUBS's mask column is applied (the loss reads masked positions through a softmax)."""
    from prism_ds.core.loss import mdm_loss

    model, tokens = _randomised(), _tokens()
    target = torch.randint(0, VOCAB - 1, tokens.shape)
    masked, t = tokens == MASK, torch.full((3,), 0.5)
    full = mdm_loss(model.eval()(tokens).logits, target, masked, t, 12.0)
    light = mdm_loss(model.train()(tokens).logits, target, masked, t, 12.0)
    assert torch.allclose(full, light, atol=1e-5)
    assert (model.train()(tokens).logits[..., MASK] < -1e5).all()


def test_activation_checkpointing_gives_the_same_gradients():
    model, tokens = _randomised(), _tokens()
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model.train()(tokens).logits.logsumexp(-1).sum().backward()
        grads.append(model.blocks[0].attn_qkv.weight.grad.clone())
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


class _Payload:  # what a crafted checkpoint could hold: a call to a function of the loader's choice
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (eval, (f"open({str(self.target)!r}, 'w').write('ran')",))


def test_a_ckpt_cannot_run_code_while_loading(tmp_path):
    model = _randomised()
    marker = tmp_path / "ran.txt"
    ckpt = {"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"config": _Payload(marker)}}
    torch.save(ckpt, tmp_path / "evil.ckpt")
    loaded, _ = load_model(tmp_path / "evil.ckpt")
    assert not marker.exists()
    assert torch.equal(loaded(_tokens()).logits, model(_tokens()).logits)


def test_the_unpickler_resolves_no_function_outside_its_list(tmp_path):
    """Allowing whole packages would not do: numpy and torch hold functions that run code they are given."""
    import io

    from prism_ds.models.mdlm import _restricted_pickle

    marker = tmp_path / "ran.txt"
    code = f"open({str(marker)!r}, 'w').write('ran')"
    for module, name in (("numpy.testing._private.utils", "runstring"), ("builtins", "exec"), ("os", "system")):
        arg = code if name != "system" else f"touch {marker}"
        payload = f"c{module}\n{name}\n(V{arg}\n(dtR.".encode() if name == "runstring" else \
            f"c{module}\n{name}\n(V{arg}\ntR.".encode()
        _restricted_pickle.load(io.BytesIO(payload))
        assert not marker.exists(), f"{module}.{name} ran"
