"""Which backend runs a model (`--engine`), and loading it: the tokenizer and the target, with the HF model that
drafters and peers share where there is one."""

from __future__ import annotations

import sys

import torch

from draftwise.core.errors import DraftwiseError
from draftwise.core.kernels import avx512_kernel, grid_kernel
from draftwise.core.machine import cpu_has_native_bf16
from draftwise.targets.hf import HFTarget
from draftwise.targets.lean.model import LEAN_FAMILIES, LeanTarget, lean_supported
from draftwise.targets.llama_cpp import LlamaCppTarget
from draftwise.targets.models import load_model, load_tokenizer_and_config, model_gguf, parse_dtype

ENGINES = ("auto", "lean", "hf", "llama")


def backend_for(engine: str) -> str:
    """The backend an `--engine` value names. `auto` is the lean PyTorch path, which `load_target` swaps for
    transformers where the model is not a plain llama; llama.cpp runs only when asked for."""
    if engine not in ENGINES:
        raise DraftwiseError(f"unknown engine '{engine}'; choose one of {', '.join(ENGINES)}")
    return "lean" if engine == "auto" else engine


def load_target(model: str, engine: str = "auto", dtype: str = "auto", device: str = "cpu"):
    """(HF model or None, tokenizer, target) for `engine`. The lean engine on CPU in bf16 (its `auto`) keeps the
    weights of an embedded GGUF model on their own 4-bit grid (loaded in fp32 to find it, then held as int4)."""
    choice = backend_for(engine)
    if choice == "llama":
        tokenizer, target = llama_parts(model)
        return None, tokenizer, target
    gguf = choice == "lean" and device == "cpu" and model_gguf(model) is not None
    compute = parse_dtype(dtype, device)
    if gguf and dtype == "auto":
        # the GGUF's own grid: int8 activations through draftwise's VNNI kernel where the CPU has AVX-512 VNNI
        # (core.kernels.avx512_kernel), else bf16 through torch's int4 kernel where it has bf16 units, else fp32 through
        # draftwise's AVX2 kernel (core.kernels.grid_kernel), else bf16 anyway (still faster than dense fp32)
        fp32_grid = avx512_kernel() is not None or (not cpu_has_native_bf16() and grid_kernel() is not None)
        compute = torch.float32 if fp32_grid else torch.bfloat16
    on_grid = gguf and (dtype == "auto" or compute == torch.bfloat16)  # an explicit fp32 stays dense: the reference
    hf_model, tokenizer = load_model(model, dtype="fp32" if on_grid else dtype, device=device)
    if choice == "lean" and not lean_supported(hf_model):
        if engine == "lean":
            raise DraftwiseError(
                f"the lean engine runs {', '.join(LEAN_FAMILIES)} models; '{model}' is "
                f"{hf_model.config.model_type} (use --engine hf)"
            )
        kind = hf_model.config.model_type
        print(f"[draftwise] the lean engine does not run {kind} models: using transformers", file=sys.stderr)
        choice = "hf"
    lean = LeanTarget(hf_model, dtype=compute, int4=on_grid) if choice == "lean" else None
    hf_model.to(compute)  # drafters and peers share it in the compute dtype
    return hf_model, tokenizer, lean if lean is not None else HFTarget(hf_model)


def llama_parts(model: str):
    """(tokenizer, target) of a GGUF model run by llama.cpp; the HF tokenizer keeps token ids identical."""
    gguf = model_gguf(model)
    if gguf is None:
        raise DraftwiseError(f"the llama engine needs a GGUF model; '{model}' is not one (use --engine hf)")
    tokenizer, config = load_tokenizer_and_config(model)
    return tokenizer, LlamaCppTarget(gguf, config)
