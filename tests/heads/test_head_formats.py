"""Published draft-head formats (draftwise.heads.formats): tiny random heads written under each format's exact key
names and config fields load, compute what their reference computes, draft losslessly; exported heads re-import
bit for bit; malformed heads are one clear error."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import error_of, greedy_reference, run, tiny_llama
from safetensors.torch import save_file

from draftwise.core.errors import DraftwiseError
from draftwise.drafters.eagle import EagleDrafter
from draftwise.heads.formats import export_head
from draftwise.heads.load import read_head, resolve_head_dir
from draftwise.heads.model import DraftHead, DraftHeadConfig, KVCache, rotary_rows

H, HEADS, KV, D, FFN, V, DRAFT_V = 64, 4, 2, 16, 128, 96, 48


@pytest.fixture(scope="module")
def target():
    return tiny_llama(vocab_size=V, layers=8)  # EAGLE-3's default layers (2, N//2, N-3) = (2, 4, 5)


def _norm_weight(n: int = H) -> torch.Tensor:
    return 1 + 0.2 * torch.randn(n)


def _layer(prefix: str, width: int, bias: bool = False, eagle3: bool = True) -> dict[str, torch.Tensor]:
    t = {
        f"{prefix}self_attn.q_proj.weight": torch.randn(HEADS * D, width) * 0.2,
        f"{prefix}self_attn.k_proj.weight": torch.randn(KV * D, width) * 0.2,
        f"{prefix}self_attn.v_proj.weight": torch.randn(KV * D, width) * 0.2,
        f"{prefix}self_attn.o_proj.weight": torch.randn(H, HEADS * D) * 0.2,
        f"{prefix}post_attention_layernorm.weight": _norm_weight(),
        f"{prefix}mlp.gate_proj.weight": torch.randn(FFN, H) * 0.2,
        f"{prefix}mlp.up_proj.weight": torch.randn(FFN, H) * 0.2,
        f"{prefix}mlp.down_proj.weight": torch.randn(H, FFN) * 0.2,
    }
    if eagle3:
        t[f"{prefix}input_layernorm.weight"] = _norm_weight()
        t[f"{prefix}hidden_norm.weight"] = _norm_weight()
    if bias:
        for name, rows in (("q", HEADS * D), ("k", KV * D), ("v", KV * D)):
            t[f"{prefix}self_attn.{name}_proj.bias"] = torch.randn(rows) * 0.1
    return t


def _llama_config(**extra) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": H,
        "intermediate_size": FFN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "num_hidden_layers": 1,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "vocab_size": V,
        "tie_word_embeddings": False,
        **extra,
    }


def _vocab_map() -> tuple[torch.Tensor, torch.Tensor]:
    """d2t offsets and the t2d mask of a draft vocabulary of every other token, shuffled."""
    targets = torch.randperm(V)[:DRAFT_V].sort().values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[targets] = True
    return targets - torch.arange(DRAFT_V), t2d


def eagle3_checkpoint(layer_prefix: str = "midlayer.", fc_norm: bool = False, norm_before_fc: bool = False):
    """SafeAILab cnets.py's state dict (SpecForge's too; vLLM's layout with layer_prefix='layers.0.')."""
    torch.manual_seed(1)
    d2t, t2d = _vocab_map()
    t = {"fc.weight": torch.randn(H, 3 * H) * 0.1, **_layer(layer_prefix, 2 * H)}
    t |= {"norm.weight": _norm_weight(), "lm_head.weight": torch.randn(DRAFT_V, H), "d2t": d2t, "t2d": t2d}
    t["embed_tokens.weight"] = torch.randn(V, H)
    if fc_norm:
        t |= {f"fc_norm.{i}.weight": _norm_weight() for i in range(3)}
    if norm_before_fc:
        t["input_norm.weight"] = _norm_weight(3 * H)
    return t


def eagle1_checkpoint():
    """SafeAILab cnets1.py's state dict: fc over [embedding, feature] with a bias, layer 0 without an input norm,
    Qwen2-style q/k/v biases, no LM head."""
    torch.manual_seed(2)
    t = {"fc.weight": torch.randn(H, 2 * H) * 0.1, "fc.bias": torch.randn(H) * 0.1}
    return t | _layer("layers.0.", H, bias=True, eagle3=False)


FORMATS = {
    "eagle1": (eagle1_checkpoint, lambda: _llama_config()),
    "eagle3-safeailab": (eagle3_checkpoint, lambda: _llama_config(draft_vocab_size=DRAFT_V)),
    "eagle3-specforge": (
        lambda: eagle3_checkpoint(fc_norm=True),
        lambda: _llama_config(
            architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=DRAFT_V, fc_norm=True, norm_output=True
        ),
    ),
    "eagle3-vllm": (
        lambda: eagle3_checkpoint("layers.0.", norm_before_fc=True),
        lambda: _llama_config(
            draft_vocab_size=DRAFT_V, eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 3, 6]}, norm_before_fc=True
        ),
    ),
    "speculators": (
        lambda: eagle3_checkpoint("layers.0."),
        lambda: {
            "architectures": ["Eagle3Speculator"],
            "speculators_model_type": "eagle3",
            "transformer_layer_config": _llama_config(),
            "draft_vocab_size": DRAFT_V,
            "eagle_aux_hidden_state_layer_ids": [2, 4, 5],
            "speculators_config": {
                "algorithm": "eagle3",
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3}],
                "default_proposal_method": "greedy",
                "verifier": {"name_or_path": "tiny", "architectures": ["LlamaForCausalLM"]},
            },
        },  # norm_before_residual absent: vLLM reads true
    ),
}


def write(directory, tensors: dict, config: dict):
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, positions):
    half = x.shape[-1] // 2
    inv = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float32) / half)
    angles = positions[:, None].float() * inv[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def reference_logits(fmt: str, t: dict, config: dict, hidden_states, tokens, embedding) -> torch.Tensor:
    """What the published model computes for n pairs (feature at i, token i+1), written from its source
    (cnets1.py / cnets.py / vLLM llama_eagle3.py), over the target vocabulary (-inf outside the draft's)."""
    layer = config.get("transformer_layer_config", config)
    p = "midlayer." if "midlayer.hidden_norm.weight" in t else "layers.0."
    emb = t.get("embed_tokens.weight", embedding)  # the target's where the head ships none
    n = tokens.numel()
    if fmt == "eagle1":
        x = F.linear(torch.cat([emb[tokens], hidden_states[-1]], -1), t["fc.weight"], t["fc.bias"])
        residual = attn_in = x
    else:
        ids = config.get("eagle_aux_hidden_state_layer_ids") or config.get("eagle_config", {}).get(
            "eagle_aux_hidden_state_layer_ids", [2, 4, 5]
        )
        chunks = [hidden_states[i] for i in ids]
        if layer.get("fc_norm"):
            chunks = [_rms(c, t[f"fc_norm.{i}.weight"]) for i, c in enumerate(chunks)]
        fused = torch.cat(chunks, -1)
        if layer.get("norm_before_fc"):
            fused = _rms(fused, t["input_norm.weight"])
        h = fused @ t["fc.weight"].T
        hn = _rms(h, t[p + "hidden_norm.weight"])
        residual = hn if config.get("norm_before_residual", fmt == "speculators") else h
        attn_in = torch.cat([_rms(emb[tokens], t[p + "input_layernorm.weight"]), hn], -1)

    def proj(name, rows):
        w, b = t[f"{p}self_attn.{name}_proj.weight"], t.get(f"{p}self_attn.{name}_proj.bias")
        return F.linear(attn_in, w, b).view(n, rows, D).transpose(0, 1)

    positions = torch.arange(n)
    q, k, v = _rope(proj("q", HEADS), positions), _rope(proj("k", KV), positions), proj("v", KV)
    k, v = k.repeat_interleave(HEADS // KV, 0), v.repeat_interleave(HEADS // KV, 0)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(n, -1)
    h = residual + a @ t[p + "self_attn.o_proj.weight"].T
    x = _rms(h, t[p + "post_attention_layernorm.weight"])
    h = h + F.linear(
        F.silu(x @ t[p + "mlp.gate_proj.weight"].T) * (x @ t[p + "mlp.up_proj.weight"].T), t[p + "mlp.down_proj.weight"]
    )
    if fmt == "eagle1":
        return h  # the target's LM head applies to it; compared as hidden states
    draft = _rms(h, t["norm.weight"]) @ t["lm_head.weight"].T
    full = torch.full((n, V), float("-inf"))
    full[:, torch.arange(DRAFT_V) + t["d2t"]] = draft
    return full


@torch.no_grad()
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_computes_what_its_reference_computes(target, tmp_path, fmt):
    tensors, config = FORMATS[fmt][0](), FORMATS[fmt][1]()
    head = read_head(write(tmp_path / fmt, tensors, config), target, torch.float32)
    tokens = torch.randint(0, V, (7,))
    hidden_states = target(torch.cat([tokens[:1], tokens])[None], output_hidden_states=True).hidden_states
    hidden_states = [s[0, :-1] for s in hidden_states]
    c = head.config
    features = torch.stack([hidden_states[i] for i in c.feature_layers], 1)
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    cache = KVCache(c.num_kv_heads, c.head_dim, 16, torch.float32, "cpu")
    logits, out = head.step(head.fuse(features), tokens, torch.arange(7), cache, mask)
    expected = reference_logits(
        fmt.split("-")[0], tensors, config, hidden_states, tokens, target.model.embed_tokens.weight
    )
    if fmt == "eagle1":  # the target's LM head on the unnormed output
        assert torch.allclose(out, expected, atol=1e-4)
        assert torch.equal(head.lm_head.weight, target.lm_head.weight)
        return
    full = torch.full((7, V), float("-inf"))
    full[:, head.draft_to_target] = logits
    assert torch.allclose(full, expected, atol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_drafts_losslessly(target, tmp_path, fmt):
    head = read_head(write(tmp_path / fmt, FORMATS[fmt][0](), FORMATS[fmt][1]()), target, torch.float32)
    drafter = EagleDrafter(head, top_k=4, depth=3, total_tokens=8)
    prompt = [3, 17, 42, 5, 9, 11]
    tokens, stats = run(target, drafter, prompt, max_new_tokens=24)
    assert tokens == greedy_reference(target, prompt, 24)  # 0 greedy mismatches
    assert drafter.draft_calls > 0


def _draftwise_head(target, **flags) -> DraftHead:
    torch.manual_seed(3)
    config = DraftHeadConfig.from_target(target.config, (2, 4, 5), DRAFT_V)
    head = DraftHead(DraftHeadConfig(**{**config.__dict__, **flags}))
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        head.draft_to_target.copy_(torch.randperm(V)[:DRAFT_V])
    return head.eval().attach_embedding(target.get_input_embeddings().weight)


class RecordingEagle(EagleDrafter):
    """Keeps every tree it proposes: tokens, parents and scores."""

    def __init__(self, head: DraftHead):
        super().__init__(head, top_k=3, depth=3, total_tokens=10)
        self.trees = []

    def propose(self, context):
        tree = super().propose(context)
        self.trees.append((tree.tokens.tolist(), tree.parents.tolist(), tree.scores.tolist()))
        return tree


def _drafts(target, head, prompt):
    drafter = RecordingEagle(head)
    tokens, _ = run(target, drafter, prompt, max_new_tokens=20)
    return tokens, drafter.trees


@pytest.mark.parametrize("fmt", ["eagle3", "speculators"])
@pytest.mark.parametrize("flags", [{}, {"norm_before_residual": True, "norm_output": True}])
def test_exported_head_reimports_bit_for_bit(target, tmp_path, fmt, flags):
    head = _draftwise_head(target, **flags)
    export_head(head, tmp_path / "out", fmt, target.config)
    again = read_head(tmp_path / "out", target, torch.float32)
    assert again.config == head.config
    for name, value in head.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    prompt = [3, 17, 42, 5, 9, 11]
    assert _drafts(target, again, prompt) == _drafts(target, head, prompt)


def test_exported_config_is_what_vllm_reads(target, tmp_path):
    export_head(_draftwise_head(target), tmp_path / "e3", "eagle3", target.config)
    config = json.loads((tmp_path / "e3" / "config.json").read_text())
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert config["draft_vocab_size"] == DRAFT_V and config["vocab_size"] == V
    assert config["norm_before_residual"] is False
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "e3" / "model.safetensors"))
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert "midlayer.hidden_norm.weight" in tensors and "norm.weight" in tensors


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def test_llama3_rope_scaling_matches_transformers_and_round_trips(target, tmp_path):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = _llama_config(draft_vocab_size=DRAFT_V, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE))
    head = read_head(write(tmp_path / "in", eagle3_checkpoint(), config), target, torch.float32)
    assert head.config.rope_llama3 == (8.0, 1.0, 4.0, 64)
    positions = torch.arange(0, 3000, 7)
    cos, signed_sin = rotary_rows(positions, D, head.config.rope, torch.float32, "cpu")
    hf = {k: v for k, v in config.items() if k != "architectures"} | {"rope_scaling": dict(LLAMA3_ROPE)}
    hf = LlamaConfig(**hf, max_position_embeddings=4096)  # (transformers moves rope_theta into the dict)
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf)(torch.zeros(1), positions[None])
    assert torch.allclose(cos, hf_cos[0], atol=1e-5)
    assert torch.allclose(signed_sin.abs(), hf_sin[0].abs(), atol=1e-5)
    export_head(head, tmp_path / "out", "eagle3", target.config)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_scaling"] == LLAMA3_ROPE
    assert read_head(tmp_path / "out", target, torch.float32).config == head.config


def _malformed(kind: str):
    tensors, config = eagle3_checkpoint(), _llama_config(draft_vocab_size=DRAFT_V)
    if kind == "missing key":
        del tensors["midlayer.hidden_norm.weight"]
    elif kind == "wrong shape":
        tensors["midlayer.mlp.up_proj.weight"] = torch.randn(FFN + 1, H)
    elif kind == "vocab out of range":
        tensors["d2t"] = tensors["d2t"] + V
    elif kind == "t2d disagrees":
        tensors["t2d"] = ~tensors["t2d"]
    elif kind == "unknown key":
        tensors["midlayer.self_attn.q_norm.weight"] = torch.ones(D)
    elif kind == "two layers":
        config["num_hidden_layers"] = 2
    elif kind == "rope scaling":
        config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    elif kind == "missing d2t":
        del tensors["d2t"]
    return tensors, config


MALFORMED = {
    "missing key": "midlayer.hidden_norm.weight",
    "wrong shape": "up_proj",
    "vocab out of range": "d2t",
    "t2d disagrees": "t2d",
    "unknown key": "midlayer.self_attn.q_norm.weight",
    "two layers": "num_hidden_layers",
    "rope scaling": "rope_scaling",
    "missing d2t": "d2t",
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_a_malformed_head_is_one_clear_error(target, tmp_path, kind):
    directory = write(tmp_path / "bad", *_malformed(kind))
    with pytest.raises(DraftwiseError, match=MALFORMED[kind].replace(".", r"\.")):
        read_head(directory, target, torch.float32)


def test_pickle_weights_are_refused_by_name(target, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_llama_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(DraftwiseError, match="pytorch_model.bin"):
        read_head(tmp_path, target, torch.float32)


def test_an_uncached_hub_id_offline_is_one_error_naming_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(DraftwiseError, match="nobody/no-such-head"):
        resolve_head_dir("nobody/no-such-head")


def test_export_head_cli_errors_are_one_line(target, tmp_path, capsys):
    model_dir = tmp_path / "model"
    target.config.save_pretrained(model_dir)
    bad = write(tmp_path / "bad", *_malformed("wrong shape"))
    line = error_of(
        capsys,
        ["export-head", "--format", "eagle3", "--model", str(model_dir), "--draft-head", str(bad), str(tmp_path / "o")],
    )
    assert "up_proj" in line
    eagle1 = write(tmp_path / "e1", eagle1_checkpoint(), _llama_config())
    line = error_of(
        capsys,
        [
            "export-head",
            "--format",
            "speculators",
            "--model",
            str(model_dir),
            "--draft-head",
            str(eagle1),
            str(tmp_path / "o"),
        ],
    )
    assert "EAGLE-1" in line
    assert not (tmp_path / "o").exists()
