"""Draft heads in the ecosystem's formats: reading EAGLE-1, EAGLE-3 (SafeAILab, SpecForge, vLLM) and vLLM
speculators checkpoints into a DraftHead, and writing a DraftHead as an EAGLE-3 or speculators checkpoint that
vLLM's `eagle3` method loads unchanged. docs/draft-heads.md ("Formats") lists each format's keys and fields.

Every head here is one decoder layer; whatever cannot be mapped exactly (more layers, a rope scaling other than
Llama 3's, a draft hidden size other than the target's, a key with no counterpart) is refused with one line naming
it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from draftwise.core.errors import DraftwiseError
from draftwise.core.files import atomic_directory
from draftwise.heads.model import DraftHead, DraftHeadConfig

FORMATS = ("draftwise", "eagle1", "eagle3", "speculators")
EXPORT_FORMATS = ("eagle3", "speculators")

# the decoder layer's keys (after the layer prefix) -> DraftHead's
_LAYER_KEYS = {
    "self_attn.q_proj.weight": "q_proj.weight",
    "self_attn.k_proj.weight": "k_proj.weight",
    "self_attn.v_proj.weight": "v_proj.weight",
    "self_attn.q_proj.bias": "q_proj.bias",
    "self_attn.k_proj.bias": "k_proj.bias",
    "self_attn.v_proj.bias": "v_proj.bias",
    "self_attn.o_proj.weight": "o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "mlp.gate_proj.weight": "gate_proj.weight",
    "mlp.up_proj.weight": "up_proj.weight",
    "mlp.down_proj.weight": "down_proj.weight",
    "input_layernorm.weight": "embed_norm.weight",  # EAGLE-3: the norm of the token embedding
    "hidden_norm.weight": "hidden_norm.weight",
}
# outside the layer (EAGLE-3; EAGLE-1 has only fc.*)
_TOP_KEYS = {"fc.weight": "fc.weight", "fc.bias": "fc.bias", "norm.weight": "final_norm.weight"}
_TOP_KEYS |= {"lm_head.weight": "lm_head.weight", "input_norm.weight": "input_norm.weight"}
_SKIPPED = {"t2d", "embed_tokens.weight", "d2t"}  # checked and used apart from the state dict


def is_native(directory: Path) -> bool:
    return (directory / "head.safetensors").exists()


def read_checkpoint(directory: Path) -> tuple[dict, dict[str, Tensor]]:
    """config.json and every tensor of the *.safetensors files in `directory` (one file or shards)."""
    config_path = directory / "config.json"
    if not config_path.exists():
        raise DraftwiseError(f"no config.json in {directory}: not a draft head checkpoint")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise DraftwiseError(f"{config_path} is not valid JSON: {exc}") from exc
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickles:
            raise DraftwiseError(
                f"{directory} holds {pickles[0]} (pickle), which draftwise does not load (it can run code): "
                "convert it to safetensors (safetensors.torch.save_file) and pass that directory"
            )
        raise DraftwiseError(f"no *.safetensors weights in {directory}")
    tensors: dict[str, Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError) as exc:
            raise DraftwiseError(f"cannot read {file}: {exc}") from exc
    return config, tensors


def detect_format(config: dict, keys) -> str:
    """eagle1 | eagle3 | speculators, from the config and the tensor names."""
    if "speculators_model_type" in config:
        return "speculators"
    if any(k.startswith(("midlayer.", "midlayers.")) or "hidden_norm" in k for k in keys):
        return "eagle3"
    if "fc.weight" in keys and any(k.startswith("layers.0.") for k in keys):
        return "eagle1"
    raise DraftwiseError(
        "cannot tell the draft head's format: expected EAGLE-1 keys (fc.weight, layers.0.*), EAGLE-3 keys "
        "(midlayer.* or layers.0.hidden_norm), or a speculators config (speculators_model_type)"
    )


def _field(config: dict, name: str, default=None):
    value = config.get(name, default)
    if value is None and default is None:
        raise DraftwiseError(f"the draft head's config.json lacks '{name}'")
    return value


def _layer_config(config: dict, fmt: str) -> dict:
    """The decoder layer's config: the top level, or speculators' transformer_layer_config plus its eagle fields."""
    if fmt != "speculators":
        return config
    if config.get("speculators_model_type") != "eagle3":
        raise DraftwiseError(
            f"speculators_model_type '{config.get('speculators_model_type')}' is not a draft head draftwise can "
            "run (only eagle3)"
        )
    layer = dict(_field(config, "transformer_layer_config"))
    for name in ("draft_vocab_size", "target_hidden_size", "eagle_aux_hidden_state_layer_ids"):
        if config.get(name) is not None:
            layer[name] = config[name]
    # vLLM reads a missing norm_before_residual as true in speculators configs (its eagle3 updater)
    layer["norm_before_residual"] = config.get("norm_before_residual", True)
    for name in ("norm_before_fc", "fc_norm", "norm_output"):
        layer[name] = config.get(name, False)
    return layer


def _refuse_unsupported(layer: dict) -> None:
    model_type = layer.get("model_type", "llama")
    if model_type not in ("llama", "qwen2", "mistral"):
        raise DraftwiseError(f"draft head model_type '{model_type}': only llama-style decoder layers are mapped")
    if int(layer.get("num_hidden_layers", 1)) != 1:
        raise DraftwiseError(
            f"the draft head has num_hidden_layers={layer['num_hidden_layers']}: draftwise runs one-layer heads"
        )
    if layer.get("hidden_act", "silu") != "silu":
        raise DraftwiseError(f"draft head hidden_act '{layer['hidden_act']}': only silu is mapped")
    _rope_llama3(layer)  # refuses scalings other than Llama 3's
    if layer.get("mlp_bias"):
        raise DraftwiseError("draft head mlp_bias: true is not mapped")
    if layer.get("norm_before_fc") and layer.get("fc_norm"):
        raise DraftwiseError("draft head config sets both norm_before_fc and fc_norm (they exclude each other)")


def _rope_llama3(layer: dict) -> tuple[float, float, float, int] | None:
    """Llama 3's rotary scaling from `rope_scaling` (or transformers 5's `rope_parameters`), None for plain rotary."""
    scaling = layer.get("rope_scaling") or layer.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type != "llama3":
        raise DraftwiseError(f"draft head rope_scaling type '{rope_type}': only plain and llama3 rotary are mapped")
    try:
        return (
            float(scaling["factor"]),
            float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]),
            int(scaling["original_max_position_embeddings"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DraftwiseError(f"draft head rope_scaling (llama3) lacks or mangles {exc}") from exc


def _feature_layers(layer: dict, fmt: str, target_layers: int) -> tuple[int, ...]:
    """Which of the target's HF hidden_states the head reads. EAGLE-1: the final normed one. EAGLE-3: the
    inputs of decoder layers (2, N//2, N-3), or the config's eagle_aux_hidden_state_layer_ids (vLLM's ids
    index the same inputs; id N would be the final state before the norm, which draftwise does not expose)."""
    if fmt == "eagle1":
        return (target_layers,)
    ids = layer.get("eagle_aux_hidden_state_layer_ids") or (layer.get("eagle_config") or {}).get(
        "eagle_aux_hidden_state_layer_ids"
    )
    ids = tuple(int(i) for i in ids) if ids else (2, target_layers // 2, target_layers - 3)
    if any(not 0 <= i < target_layers for i in ids):
        raise DraftwiseError(
            f"eagle_aux_hidden_state_layer_ids {list(ids)} must index the target's {target_layers} decoder layers "
            f"(0..{target_layers - 1})"
        )
    return ids


def head_config(config: dict, tensors: dict[str, Tensor], fmt: str, target_config) -> DraftHeadConfig:
    """The DraftHeadConfig of a published head for a target whose HF config is `target_config`."""
    layer = _layer_config(config, fmt)
    _refuse_unsupported(layer)
    hidden = int(_field(layer, "hidden_size"))
    target_hidden = int(layer.get("target_hidden_size") or hidden)
    if target_hidden != hidden:
        raise DraftwiseError(
            f"draft head target_hidden_size {target_hidden} differs from its hidden_size {hidden}: draftwise's "
            "head shares the target's width"
        )
    heads = int(_field(layer, "num_attention_heads"))
    rope = layer.get("rope_theta") or (layer.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    vocab = int(_field(layer, "vocab_size"))
    flags = {}
    if fmt == "eagle1":
        flags = {"fuse_embedding": True, "final_norm": False, "fc_bias": "fc.bias" in tensors}
        flags["qkv_bias"] = "layers.0.self_attn.q_proj.bias" in tensors
    else:
        eagle_config = layer.get("eagle_config") or {}  # vLLM reads norm_before_fc here first
        flags = {name: bool(eagle_config.get(name, layer.get(name, False))) for name in ("norm_before_fc", "fc_norm")}
        flags["norm_output"] = bool(layer.get("norm_output", False))
        flags["norm_before_residual"] = bool(layer.get("norm_before_residual", False))
        flags["qkv_bias"] = bool(layer.get("attention_bias", False)) or any(k.endswith("q_proj.bias") for k in tensors)
    return DraftHeadConfig(
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(layer.get("num_key_value_heads") or heads),
        head_dim=int(layer.get("head_dim") or hidden // heads),
        intermediate_size=int(_field(layer, "intermediate_size")),
        draft_vocab_size=vocab if fmt == "eagle1" else int(layer.get("draft_vocab_size") or vocab),
        target_vocab_size=vocab,
        feature_layers=_feature_layers(layer, fmt, target_config.num_hidden_layers),
        rope_theta=float(rope),
        rms_norm_eps=float(layer.get("rms_norm_eps", 1e-6)),
        rope_llama3=_rope_llama3(layer),
        **flags,
    )


def _state_dict(tensors: dict[str, Tensor], fmt: str) -> dict[str, Tensor]:
    """The checkpoint's tensors under DraftHead's names; an unknown key is refused by name."""
    prefixes = ("layers.0.",) if fmt in ("eagle1", "speculators") else ("midlayer.", "midlayers.0.", "layers.0.")
    state = {}
    for key, value in tensors.items():
        if key in _SKIPPED:
            continue
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        name = _LAYER_KEYS.get(key[len(prefix) :]) if prefix else _TOP_KEYS.get(key)
        if key.startswith("fc_norm.") and key.endswith(".weight"):
            name = "fc_norms." + key[len("fc_norm.") :]
        if name is None or (fmt == "eagle1" and name in ("embed_norm.weight", "hidden_norm.weight")):
            raise DraftwiseError(f"draft head key '{key}' ({fmt}) has no counterpart in draftwise's head")
        state[name] = value
    return state


def draft_to_target(tensors: dict[str, Tensor], c: DraftHeadConfig) -> Tensor:
    """Draft id -> target id from EAGLE-3's d2t offsets (target = draft + d2t[draft]), checked against t2d."""
    base = torch.arange(c.draft_vocab_size)
    if "d2t" not in tensors:
        if c.draft_vocab_size != c.target_vocab_size:
            raise DraftwiseError(
                f"draft head key 'd2t' is missing: the draft vocabulary ({c.draft_vocab_size}) is smaller than the "
                f"target's ({c.target_vocab_size})"
            )
        return base
    d2t = tensors["d2t"]
    if d2t.shape != (c.draft_vocab_size,) or d2t.is_floating_point():
        raise DraftwiseError(
            f"draft head key 'd2t' has {d2t.dtype} {list(d2t.shape)}, expected int [{c.draft_vocab_size}]"
        )
    mapping = base + d2t.long()
    if (
        int(mapping.min()) < 0
        or int(mapping.max()) >= c.target_vocab_size
        or mapping.unique().numel() != mapping.numel()
    ):
        raise DraftwiseError(
            f"draft head key 'd2t' maps draft ids outside the target vocabulary 0..{c.target_vocab_size - 1} "
            "or onto one target id twice"
        )
    t2d = tensors.get("t2d")
    if t2d is not None:
        selected = torch.zeros(c.target_vocab_size, dtype=torch.bool)
        selected[mapping] = True
        if t2d.shape != (c.target_vocab_size,) or not torch.equal(t2d.bool(), selected):
            raise DraftwiseError("draft head key 't2d' disagrees with 'd2t' (the target ids each draft id maps to)")
    return mapping


def load_published(directory: Path, target_config, dtype: torch.dtype = torch.float32) -> tuple[DraftHead, str]:
    """A published head (EAGLE-1, EAGLE-3, speculators) as a DraftHead for a target with HF config
    `target_config`; returns it with its format name. EAGLE-1 heads use the target's LM head: the caller
    copies it in (`head.lm_head`), as it attaches the token embedding."""
    config, tensors = read_checkpoint(directory)
    fmt = detect_format(config, tensors.keys())
    c = head_config(config, tensors, fmt, target_config)
    if c.hidden_size != target_config.hidden_size or c.target_vocab_size != target_config.vocab_size:
        raise DraftwiseError(
            f"the {fmt} draft head in {directory} was trained for another model: hidden/vocab size "
            f"{c.hidden_size}/{c.target_vocab_size}, the target's "
            f"{target_config.hidden_size}/{target_config.vocab_size}"
        )
    head = DraftHead(c)
    state = _state_dict(tensors, fmt)
    expected = head.state_dict()
    if fmt == "eagle1":  # the target's LM head, filled in by the caller
        state["lm_head.weight"] = expected["lm_head.weight"]
    state["draft_to_target"] = draft_to_target(tensors, c)
    for name, value in expected.items():
        if name not in state:
            prefix = next(
                (p for p in ("midlayer.", "midlayers.0.") if any(k.startswith(p) for k in tensors)), "layers.0."
            )
            original = next((k for k, v in _TOP_KEYS.items() if v == name), None)
            original = original or prefix + next((k for k, v in _LAYER_KEYS.items() if v == name), name)
            raise DraftwiseError(f"draft head key '{original}' ({fmt}) is missing from {directory}")
        if state[name].shape != value.shape:
            raise DraftwiseError(
                f"draft head tensor for '{name}' ({fmt}) has shape {list(state[name].shape)}, "
                f"expected {list(value.shape)}"
            )
    head.load_state_dict(state)
    head = head.to(dtype)
    embedding = tensors.get("embed_tokens.weight")
    if embedding is not None:  # the head's own copy, as vLLM uses it where a checkpoint ships one
        if embedding.shape != (c.target_vocab_size, c.hidden_size):
            raise DraftwiseError(
                f"draft head key 'embed_tokens.weight' has shape {list(embedding.shape)}, "
                f"expected {[c.target_vocab_size, c.hidden_size]}"
            )
        head.own_embedding = embedding.to(dtype)
    return head.eval(), fmt


def _layer_config_out(head: DraftHead, target_config, fmt: str) -> dict:
    c = head.config
    layer = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "num_hidden_layers": 1,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": int(getattr(target_config, "max_position_embeddings", 2048)),
        "vocab_size": c.target_vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": c.qkv_bias,
    }
    if c.rope_llama3 is not None:
        factor, low, high, original = c.rope_llama3
        layer["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": original,
        }
    if fmt == "eagle3":
        layer["draft_vocab_size"] = c.draft_vocab_size
        layer["eagle_aux_hidden_state_layer_ids"] = list(c.feature_layers)
        for flag in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output"):
            layer[flag] = getattr(c, flag)
    return layer


def export_tensors(head: DraftHead, fmt: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """The head's tensors under EAGLE-3's names: midlayer.* (SafeAILab) or layers.0.* (speculators)."""
    c = head.config
    prefix = "midlayer." if fmt == "eagle3" else "layers.0."
    names = {mine: prefix + theirs for theirs, mine in _LAYER_KEYS.items()}
    names |= {mine: theirs for theirs, mine in _TOP_KEYS.items()}
    out = {}
    for name, value in head.state_dict().items():
        if name == "draft_to_target":
            continue
        key = "fc_norm." + name[len("fc_norms.") :] if name.startswith("fc_norms.") else names[name]
        out[key] = value.to(dtype)
    if head.fc is None:  # one feature layer: vLLM always applies fc, so the identity stands in exactly
        out["fc.weight"] = torch.eye(c.hidden_size, dtype=dtype)
    if c.draft_vocab_size != c.target_vocab_size:
        mapping = head.draft_to_target.cpu().long()
        out["d2t"] = mapping - torch.arange(c.draft_vocab_size)
        t2d = torch.zeros(c.target_vocab_size, dtype=torch.bool)
        t2d[mapping] = True
        out["t2d"] = t2d
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def export_head(
    head: DraftHead, out: Path, fmt: str, target_config, verifier: str = "", dtype: torch.dtype = torch.float32
) -> None:
    """Write `head` as an EAGLE-3 checkpoint (`eagle3`: SafeAILab's keys and config, as vLLM's eagle3 method and
    SGLang read it) or a vLLM speculators one, as a whole (a reader sees the old directory or the new one)."""
    c = head.config
    if fmt not in EXPORT_FORMATS:
        raise DraftwiseError(f"unknown export format '{fmt}'; choose one of {', '.join(EXPORT_FORMATS)}")
    if c.fuse_embedding:
        raise DraftwiseError("an EAGLE-1 head (fc over [embedding, feature]) has no EAGLE-3 form")
    if not c.final_norm:
        raise DraftwiseError("a head without a final norm has no EAGLE-3 form (EAGLE-3 always norms before lm_head)")
    if c.fc_bias:
        raise DraftwiseError("vLLM's EAGLE-3 fc has no bias: this head's fc.bias cannot be written")
    if c.norm_before_fc and c.fc_norm:
        raise DraftwiseError("norm_before_fc and fc_norm exclude each other in EAGLE-3 configs")
    if len(c.feature_layers) == 1 and (c.norm_before_fc or c.fc_norm):
        raise DraftwiseError("a one-layer head with a feature norm has no fc to put it before")
    layers = target_config.num_hidden_layers
    if any(i >= layers for i in c.feature_layers):
        raise DraftwiseError(
            f"the head reads feature layer {max(c.feature_layers)} (the target's final normed state); vLLM's "
            f"eagle_aux_hidden_state_layer_ids index decoder inputs 0..{layers - 1} only"
        )
    layer = _layer_config_out(head, target_config, fmt)
    if fmt == "eagle3":
        config = layer
    else:
        config = {
            "architectures": ["Eagle3Speculator"],
            "speculators_model_type": "eagle3",
            "transformer_layer_config": layer,
            "draft_vocab_size": c.draft_vocab_size,
            "norm_before_residual": c.norm_before_residual,
            "norm_before_fc": c.norm_before_fc,
            "fc_norm": c.fc_norm,
            "norm_output": c.norm_output,
            "target_hidden_size": None,
            "eagle_aux_hidden_state_layer_ids": list(c.feature_layers),
            "speculators_config": {
                "algorithm": "eagle3",
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3}],
                "default_proposal_method": "greedy",
                "verifier": {
                    "name_or_path": verifier,
                    "architectures": list(getattr(target_config, "architectures", None) or ["LlamaForCausalLM"]),
                },
            },
        }
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    tensors = export_tensors(head, fmt, dtype)
    with atomic_directory(Path(out)) as staging:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
