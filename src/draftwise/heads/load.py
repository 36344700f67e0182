"""Finding and loading a draft head for a target: the one shipped for the model, or one the user trained."""

from __future__ import annotations

from pathlib import Path

from draftwise.core.errors import DraftwiseError
from draftwise.core.kernels import avx512_kernel
from draftwise.heads.model import DraftHead
from draftwise.targets.lean.linears import quantize_draft_linears

HEADS_DIR = Path(__file__).resolve().parent.parent / "data" / "heads"


def shipped_head_dir(model_name: str) -> Path | None:
    path = HEADS_DIR / model_name
    return path if (path / "head.safetensors").exists() else None



def load_head(engine, draft_head: str | None = None) -> DraftHead:
    """The head at `draft_head`, or the one shipped for the engine's model, on the target's device."""
    directory = Path(draft_head) if draft_head else shipped_head_dir(engine.model_name)
    if directory is None:
        raise DraftwiseError(
            f"no draft head ships for model '{engine.model_name}'; train one (`draftwise distill` then "
            "`draftwise train-draft`) and pass --draft-head DIR"
        )
    if engine.model is None:
        raise DraftwiseError("draft heads read the target's hidden features, which only the hf engine exposes")
    target = engine.model
    head = DraftHead.load(directory, dtype=next(target.parameters()).dtype, device=engine.target.device)
    c = head.config
    if c.target_vocab_size != target.config.vocab_size or c.hidden_size != target.config.hidden_size:
        raise DraftwiseError(f"the draft head in {directory} was trained for another model (vocab/hidden size differ)")
    if max(c.feature_layers) > target.config.num_hidden_layers:
        raise DraftwiseError(f"the draft head in {directory} reads layers the model does not have")
    head.target_compute = engine.target.dtype_name
    if "+" in head.target_compute:  # next to a 4-bit target, a full-precision head call would cost 1/6 of a step
        quantize_draft_linears(head)
    if getattr(engine.target, "attention", None) is not None:  # the lean target on csrc/avx512.cpp
        head.kernel = avx512_kernel()
        head.pack_layer()
    return head.attach_embedding(target.get_input_embeddings().weight)


