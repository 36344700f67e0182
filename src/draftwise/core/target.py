"""What the decode loop needs from a target model (the `Target` protocol), what one verify forward returns, and
what a target computes in (`ComputeMode`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class TargetOutput:
    logits: Tensor  # (N, V) float32: next-token scores after each node
    features: Tensor | None  # (N, F, H) hidden states at the requested layers, or None
