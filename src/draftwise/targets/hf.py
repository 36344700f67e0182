"""Any Hugging Face causal LM as a target (draftwise.core.target.Target), run by transformers: prefill, one
tree-verify forward per round, and KV compaction on commit."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache

from draftwise.core.kernels import use_small_batch_linear
from draftwise.core.target import ComputeMode, TargetBase, TargetOutput
from draftwise.core.tree import DraftTree


class HFTarget(TargetBase):
    """Any Hugging Face causal LM, driven one draft tree at a time.

    `feature_layers` index the model's `hidden_states` tuple: i < num_layers is the input of decoder layer i,
    and num_layers is the final (normed) feature that feeds the LM head. Draft heads read these.
    """

    backend = "hf"
    max_leaves: int | None = None  # no limit on tree shape
    verify_cost = None  # not measured: on this path a tree costs little more than one token, drafters go big
    native_kernels = None

    def __init__(self, model, feature_layers: tuple[int, ...] = (), small_batch_linear: bool = True):
        if small_batch_linear:
            use_small_batch_linear(model)
        self.model = model
        self.config = model.config
        self.device = next(model.parameters()).device
        self.max_length = int(getattr(model.config, "max_position_embeddings", 2048))
        self.feature_layers = tuple(feature_layers)
        self.cache = DynamicCache(config=model.config)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def compute(self) -> ComputeMode:
        return ComputeMode.dense(self.model.dtype)

    @property
    def length(self) -> int:
        """Number of tokens in the KV cache."""
        return self.cache.get_seq_length()

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model.config)

    def _features(self, out) -> Tensor | None:
        if not self.feature_layers:
            return None
        return torch.stack([out.hidden_states[i][0] for i in self.feature_layers], dim=1)

    @torch.inference_mode()
    def prefill(self, token_ids: Tensor) -> Tensor | None:
        """Put `token_ids` (T,) into an empty cache. Returns their features (T, F, H) if any are requested."""
        self.reset()
        if token_ids.numel() == 0:
            return None
        out = self.model(
            input_ids=token_ids[None].to(self.device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,  # the last prompt token is the first tree's root: no logits needed here
            output_hidden_states=bool(self.feature_layers),
        )
        return self._features(out)

    @torch.inference_mode()
    def forward(self, token_ids: Tensor, position_ids: Tensor, attention_mask: Tensor) -> TargetOutput:
        """Append `token_ids` (N,) to the cache at `position_ids` (1, N) under a bool `attention_mask`
        (1, 1, N, cache + N), True = attend."""
        out = self.model(
            input_ids=token_ids[None].to(self.device),
            position_ids=position_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            past_key_values=self.cache,
            use_cache=True,
            output_hidden_states=bool(self.feature_layers),
        )
        return TargetOutput(out.logits[0].float(), self._features(out))

    def _forward_tree(self, tree: DraftTree) -> TargetOutput:
        past = self.length
        return self.forward(tree.tokens, tree.position_ids(past), tree.attention_mask(past))

    def truncate(self, length: int) -> None:
        """Drop cached tokens past `length`."""
        extra = self.length - length
        if extra > 0:
            self.cache.crop(-extra)

    @torch.inference_mode()
    def commit(self, past_length: int, path: list[int]) -> None:
        """Keep only the accepted `path` (tree node indices, root first) after a verify forward at `past_length`."""
        n = len(path)
        if path != list(range(n)):
            slots = torch.tensor(path, device=self.device) + past_length
            for layer in self.cache.layers:
                layer.keys[:, :, past_length : past_length + n] = layer.keys[:, :, slots]
                layer.values[:, :, past_length : past_length + n] = layer.values[:, :, slots]
        self.truncate(past_length + n)
