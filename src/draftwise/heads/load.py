"""Finding and loading a draft head for a target: the one shipped for the model, one the user trained, or a published
one (EAGLE-1/3, speculators; `heads.formats`) from a directory or the Hugging Face hub."""

from __future__ import annotations

from pathlib import Path

from draftwise.core.errors import DraftwiseError
from draftwise.core.target import Target
from draftwise.heads.formats import is_native, load_published
from draftwise.heads.model import DraftHead
from draftwise.targets.lean.linears import quantize_draft_linears
from draftwise.targets.models import download_hub_snapshot

HEADS_DIR = Path(__file__).resolve().parent.parent / "data" / "heads"


def shipped_head_dir(model_name: str) -> Path | None:
    path = HEADS_DIR / model_name
    return path if (path / "head.safetensors").exists() else None


def resolve_head_dir(draft_head: str) -> Path:
    """A local directory as it is; a Hugging Face hub id (owner/name) downloaded into the HF cache (config.json and
    *.safetensors only: pickle weights are never fetched), or found there when offline."""
    path = Path(draft_head).expanduser()
    if path.exists():
        return path
    if draft_head.count("/") != 1 or draft_head.startswith((".", "/", "~")):
        raise DraftwiseError(f"no draft head directory '{draft_head}' (and it is not a hub id owner/name)")
    return download_hub_snapshot(draft_head, ["config.json", "*.safetensors", "*.safetensors.index.json"], "draft head")


def read_head(directory: Path, model, dtype) -> DraftHead:
    """draftwise's own head, or a published one (heads.formats) mapped onto it, for the HF model `model`."""
    if is_native(directory):
        head = DraftHead.load(directory, dtype=dtype)
    else:
        head, fmt = load_published(directory, model.config, dtype=dtype)
        if fmt == "eagle1":  # EAGLE-1 drafts through the target's own LM head
            head.lm_head.weight.data = model.get_output_embeddings().weight.detach().to(dtype)
    c = head.config
    if c.target_vocab_size != model.config.vocab_size or c.hidden_size != model.config.hidden_size:
        raise DraftwiseError(f"the draft head in {directory} was trained for another model (vocab/hidden size differ)")
    if max(c.feature_layers) > model.config.num_hidden_layers:
        raise DraftwiseError(f"the draft head in {directory} reads layers the model does not have")
    embedding = head.own_embedding if head.own_embedding is not None else model.get_input_embeddings().weight
    return head.attach_embedding(embedding)


def load_head(target: Target, model, model_name: str, draft_head: str | None = None) -> DraftHead:
    """The head at `draft_head` (a directory or a hub id, in draftwise's format or a published one), or the one
    shipped for `model_name`, for `target` whose HF model is `model` (None where the target runs elsewhere, as under
    llama.cpp), on the target's device."""
    directory = resolve_head_dir(draft_head) if draft_head else shipped_head_dir(model_name)
    if directory is None:
        raise DraftwiseError(
            f"no draft head ships for model '{model_name}'; train one (`draftwise distill` then "
            "`draftwise train-draft`) and pass --draft-head DIR"
        )
    if model is None:
        raise DraftwiseError("draft heads read the target's hidden features, which only the hf engine exposes")
    head = read_head(directory, model, next(model.parameters()).dtype).to(target.device)
    head.attach_embedding(head.embed.to(target.device))
    if target.compute.weights is not None:  # next to a 4-bit target, a full-precision head call costs too much
        quantize_draft_linears(head)
    if target.native_kernels is not None:  # the lean target on csrc/avx512.cpp: the head's layer runs there too
        head.kernel = target.native_kernels
        head.pack_layer()
    return head
