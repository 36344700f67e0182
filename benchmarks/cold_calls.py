"""What small NumPy / torch calls cost where a round runs them: in a tight loop, after the caches were flushed
(a 64 MB read, `profile.evict_caches`), and right after a one-node target forward of the default model.

    python benchmarks/cold_calls.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

import draftwise
from draftwise.profile import evict_caches
from draftwise.tree import DraftTree


def main() -> None:
    torch.set_num_threads(2)
    target = draftwise.load(method="ar").target
    probe, root = torch.tensor([1, 2]), DraftTree.root_only(3)

    def forward() -> None:
        target.prefill(probe)
        target.forward_tree(root)

    small = np.random.randn(136).astype(np.float32)
    scores = -torch.rand(72)
    weight = np.random.randn(1024, 536).astype(np.float32)
    x = np.random.randn(536).astype(np.float32)
    weight_t, x_t = torch.from_numpy(weight), torch.from_numpy(x)
    calls = {
        "np.clip of 136 floats": lambda: np.clip(small, -30, 0),
        "tensor slice -> .float().numpy()": lambda: scores[:8].float().numpy(),
        "1024 x 536 product, W @ x (NumPy's BLAS)": lambda: weight @ x,
        "the same by np.einsum": lambda: np.einsum("ij,j->i", weight, x),
        "the same by torch.mv": lambda: torch.mv(weight_t, x_t),
    }
    print(f"{'call':44s} {'loop':>9s} {'flushed':>9s} {'after fwd':>9s}  (median µs)")
    for name, call in calls.items():
        row = []
        for before in (None, evict_caches, forward):
            times = []
            for _ in range(40):
                if before is not None:
                    before()
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            row.append(1e6 * statistics.median(times))
        print(f"{name:44s} {row[0]:9.1f} {row[1]:9.1f} {row[2]:9.1f}")


if __name__ == "__main__":
    main()
