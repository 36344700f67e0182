"""Laying the lean target's weights out in memory: copies in 2 MB pages, which a decode step that streams every
weight walks far fewer page tables for."""

from __future__ import annotations

import ctypes
import mmap
import os

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20


def in_huge_pages(tensors: list[Tensor]) -> tuple[list[Tensor], mmap.mmap | None]:
    """Copies of the CPU `tensors` laid out in one anonymous mapping that asks Linux for 2 MB pages (transparent
    huge pages, `madvise`), and the mapping. A decode step streams every weight: in 4 KB pages that is ~20,000
    page-table walks a step, and the round's Python work after it finds the TLB flushed too. Where the OS cannot
    be asked (no `MADV_HUGEPAGE`), or `DRAFTWISE_HUGE_PAGES=0`, the tensors come back as they are."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or os.environ.get("DRAFTWISE_HUGE_PAGES", "1") == "0" or not tensors:
        return tensors, None
    sizes = [-(-t.nbytes // 64) * 64 for t in tensors]  # 64-byte aligned, as the kernels' loads like
    arena = mmap.mmap(-1, sum(sizes) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arena.madvise(advice)
    address = ctypes.addressof(ctypes.c_char.from_buffer(arena))
    offset = -address % HUGE_PAGE  # the first 2 MB boundary: pages are only huge inside aligned 2 MB blocks
    copies = []
    for tensor, size in zip(tensors, sizes, strict=True):
        view = torch.frombuffer(arena, dtype=torch.uint8, count=tensor.nbytes, offset=offset)
        copies.append(view.view(tensor.dtype).view(tensor.shape).copy_(tensor))
        offset += size
    return copies, arena
