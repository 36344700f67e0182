"""Facts about the machine draftwise runs on: its CPU's instruction sets and where draftwise caches files."""

from __future__ import annotations

import functools
import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of draftwise's cache: $DRAFTWISE_CACHE, else ~/.cache/draftwise."""
    return Path(os.environ.get("DRAFTWISE_CACHE", Path.home() / ".cache" / "draftwise")).expanduser()


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def cpu_has_avx2_fma() -> bool:
    return {"avx2", "fma"} <= cpu_flags()


def cpu_has_avx512_vnni() -> bool:
    return {"avx512f", "avx512bw", "avx512_vnni"} <= cpu_flags()


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX-512 BF16 or AMX). Without it, bf16 matmuls over more than
    one token are emulated, and a tree costs many times a one-token step (docs/results.md)."""
    return "avx512_bf16" in cpu_flags() or "amx_bf16" in cpu_flags()
