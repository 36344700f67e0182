"""Finding and loading a draft head for a target: the one shipped for the model, or one the user trained."""

from __future__ import annotations

from pathlib import Path

from draftwise.core.errors import DraftwiseError
from draftwise.core.target import Target
from draftwise.heads.model import DraftHead
from draftwise.targets.lean.linears import quantize_draft_linears

HEADS_DIR = Path(__file__).resolve().parent.parent / "data" / "heads"


def shipped_head_dir(model_name: str) -> Path | None:
    path = HEADS_DIR / model_name
    return path if (path / "head.safetensors").exists() else None


def load_head(target: Target, model, model_name: str, draft_head: str | None = None) -> DraftHead:
    """The head at `draft_head`, or the one shipped for `model_name`, for `target` whose HF model is `model` (None
    where the target runs elsewhere, as under llama.cpp), on the target's device."""
    directory = Path(draft_head) if draft_head else shipped_head_dir(model_name)
    if directory is None:
        raise DraftwiseError(
            f"no draft head ships for model '{model_name}'; train one (`draftwise distill` then "
            "`draftwise train-draft`) and pass --draft-head DIR"
        )
    if model is None:
        raise DraftwiseError("draft heads read the target's hidden features, which only the hf engine exposes")
    head = DraftHead.load(directory, dtype=next(model.parameters()).dtype, device=target.device)
    c = head.config
    if c.target_vocab_size != model.config.vocab_size or c.hidden_size != model.config.hidden_size:
        raise DraftwiseError(f"the draft head in {directory} was trained for another model (vocab/hidden size differ)")
    if max(c.feature_layers) > model.config.num_hidden_layers:
        raise DraftwiseError(f"the draft head in {directory} reads layers the model does not have")
    if target.compute.weights is not None:  # next to a 4-bit target, a full-precision head call costs too much
        quantize_draft_linears(head)
    if target.native_kernels is not None:  # the lean target on csrc/avx512.cpp: the head's layer runs there too
        head.kernel = target.native_kernels
        head.pack_layer()
    return head.attach_embedding(model.get_input_embeddings().weight)
