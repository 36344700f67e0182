"""The target model run by llama.cpp (through llama-cpp-python's C API), verifying draft trees in one batch.

llama.cpp runs the GGUF's quantized weights directly (Q4_1 for the default model: far fewer bytes per token than
the fp32 weights transformers dequantizes to), which is where CPU decoding time goes.

A tree is one `llama_decode` batch using llama.cpp's multi-sequence KV cache: every root-to-leaf branch is
a sequence id, a node belongs to the sequences of all the leaves below it, and the committed context (seq 0)
is shared with every branch by `seq_cp`. llama.cpp then masks attention exactly like the tree mask: a node
sees the context and its own ancestors. Commit keeps the accepted branch in seq 0 and drops the others.
A `Target` (draftwise.core.target), minus features (draft heads need the lean or hf engine).
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np
import torch

from draftwise.core.errors import DraftwiseError
from draftwise.core.machine import cpu_flags
from draftwise.core.target import ComputeMode, TargetBase, TargetOutput
from draftwise.core.tree import DraftTree

MAX_BRANCHES = 64  # sequence ids per tree; decode trims trees with more leaves
GRAVEYARD = MAX_BRANCHES  # sequence id of parked rejected nodes (see LlamaCppTarget.commit)
MAX_PARKED = 1024  # parked cells before the cache is rebuilt


def import_llama_cpp():
    try:
        import llama_cpp  # the optional [llama] extra
    except ImportError as exc:
        raise DraftwiseError(
            "the llama engine needs llama-cpp-python: `pip install 'draftwise[llama]'` (it compiles llama.cpp "
            "once, ~5 min on 2 cores); or use --engine hf"
        ) from exc
    if "amx_int8" in cpu_flags():
        _without_amx_repack(llama_cpp)
    return llama_cpp


def _without_amx_repack(llama_cpp) -> None:
    """llama.cpp built for the CPU it runs on repacks the weights into its AMX layout at load, and on AMX Xeons
    that repack segfaults (llama-cpp-python 0.3.36, SmolLM2's Q4_1 GGUF, blk.2.attn_k): models here load without
    the extra buffer types, for draftwise's engine and for the llama.cpp peers in benchmarks alike."""
    from llama_cpp import llama_cpp as bindings

    defaults = bindings.llama_model_default_params
    if getattr(defaults, "draftwise", False):
        return

    def model_params():
        params = defaults()
        params.use_extra_bufts = False
        return params

    model_params.draftwise = True
    bindings.llama_model_default_params = llama_cpp.llama_model_default_params = model_params


class LlamaCppTarget(TargetBase):
    """A GGUF model in llama.cpp, driven one draft tree at a time (see the module docstring)."""

    backend = "llama"
    compute = ComputeMode("gguf")
    native_kernels = None
    feature_layers: tuple[int, ...] = ()
    max_leaves = MAX_BRANCHES

    def __init__(self, gguf_path: str | Path, config, n_ctx: int | None = None, n_threads: int | None = None):
        lc = self._lc = import_llama_cpp()
        if not Path(gguf_path).is_file():
            raise DraftwiseError(f"no GGUF file at '{gguf_path}'")
        silence_llama_logs(lc)
        lc.llama_backend_init()
        self.config = config
        self.device = torch.device("cpu")
        self.max_length = int(n_ctx or getattr(config, "max_position_embeddings", 2048))
        self._model = lc.llama_model_load_from_file(str(gguf_path).encode(), lc.llama_model_default_params())
        if not self._model:
            raise DraftwiseError(f"llama.cpp could not load '{gguf_path}'")
        params = lc.llama_context_default_params()
        params.n_ctx = self.max_length
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = MAX_BRANCHES + 1
        params.kv_unified = True  # one cache shared by all branches: the context is stored once
        params.flash_attn_type = int(os.environ.get("DRAFTWISE_LLAMA_FA", "-1"))
        params.n_threads = params.n_threads_batch = int(n_threads or os.cpu_count() or 1)
        self._ctx = lc.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise DraftwiseError("llama.cpp could not create a context")
        self._memory = lc.llama_get_memory(self._ctx)
        self.vocab_size = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model))
        self._batch = lc.llama_batch_init(params.n_batch, 0, MAX_BRANCHES)
        self._branches = 1  # sequence ids used by the last tree
        self.reset()
        self._cost = self._calibrate()

    def _calibrate(self) -> tuple[float, float]:
        """(a, b) of verify seconds = a + b * nodes, timed on this machine at load. Tree drafters size their trees
        from it: here, unlike transformers' path, each extra verified token costs a sizeable share of a step."""

        def seconds(n: int) -> float:
            times = []
            for _ in range(3):
                start = time.perf_counter()
                self._decode(list(range(100, 100 + n)), list(range(CONTEXT, CONTEXT + n)), [[0]] * n, logits=True)
                times.append(time.perf_counter() - start)
                self._lc.llama_memory_seq_rm(self._memory, 0, CONTEXT, -1)
            return min(times)

        CONTEXT = 256  # noqa: N806 - a typical chat context
        self._decode(list(range(1000, 1000 + CONTEXT)), list(range(CONTEXT)), [[0]] * CONTEXT, logits=False)
        one, four = seconds(1), seconds(4)
        self.reset()
        slope = max(four - one, 0.0) / 3
        return one - slope, slope

    def verify_cost(self, nodes: int) -> float:
        """Measured seconds to verify a tree of `nodes` nodes (root included)."""
        return self._cost[0] + self._cost[1] * nodes

    def __del__(self):
        lc = getattr(self, "_lc", None)
        if lc is None:
            return
        if getattr(self, "_batch", None) is not None:
            lc.llama_batch_free(self._batch)
        if getattr(self, "_ctx", None):
            lc.llama_free(self._ctx)
        if getattr(self, "_model", None):
            lc.llama_model_free(self._model)

    @property
    def length(self) -> int:
        return self._length

    def reset(self) -> None:
        self._lc.llama_memory_clear(self._memory, True)
        self._length = self._parked = 0
        self._committed: list[int] = []

    def _decode(self, tokens: list[int], positions: list[int], seqs: list[list[int]], logits: bool) -> None:
        batch = self._batch
        for i, (token, pos, seq) in enumerate(zip(tokens, positions, seqs, strict=True)):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = len(seq)
            for j, s in enumerate(seq):
                batch.seq_id[i][j] = s
            batch.logits[i] = logits
        batch.n_tokens = len(tokens)
        status = self._lc.llama_decode(self._ctx, batch)
        if status != 0:
            raise DraftwiseError(f"llama_decode failed with status {status} (context full?)")

    def prefill(self, token_ids: torch.Tensor) -> None:
        """Put `token_ids` (T,) into an empty cache, in chunks of the batch size."""
        self.reset()
        ids = token_ids.tolist()
        if len(ids) > self.max_length:
            raise DraftwiseError(f"the prompt is {len(ids)} tokens; the context window is {self.max_length}")
        for start in range(0, len(ids), 512):
            chunk = ids[start : start + 512]
            self._decode(chunk, list(range(start, start + len(chunk))), [[0]] * len(chunk), logits=False)
        self._length = len(ids)
        self._committed = ids
        return None

    def _forward_tree(self, tree: DraftTree) -> TargetOutput:
        """One batch over every node of `tree`, masked by llama.cpp's sequences as the tree masks it."""
        past, n = self._length, tree.size
        if n == 1 or bool((tree.parents[1:] == torch.arange(n - 1)).all()):  # a chain: one sequence, no masks
            leaves, seqs, depths = [n - 1], [[0]] * n, list(range(n))
        else:
            leaves = tree.leaves().tolist()
            if len(leaves) > MAX_BRANCHES:
                raise DraftwiseError(f"a tree with {len(leaves)} leaves exceeds the llama engine's {MAX_BRANCHES}")
            below = tree.ancestors[leaves]  # (B, N): leaf b's branch covers node i
            seqs = [below[:, i].nonzero().flatten().tolist() for i in range(n)]
            depths = tree.depths.tolist()
        for branch in range(1, len(leaves)):
            self._lc.llama_memory_seq_cp(self._memory, 0, branch, -1, -1)
        self._branches = len(leaves)
        self._decode(tree.tokens.tolist(), [past + d for d in depths], seqs, logits=True)
        raw = self._lc.llama_get_logits(self._ctx)
        logits = np.ctypeslib.as_array(raw, shape=(n, self.vocab_size))
        self._length = past + n
        self._leaf_of = [seq[0] for seq in seqs]  # one branch through each node
        self._depths = depths
        self._tree_tokens = tree.tokens.tolist()
        return TargetOutput(torch.from_numpy(logits.copy()), None)

    def commit(self, past_length: int, path: list[int]) -> None:
        """Keep the accepted `path` (node indices, root first) in seq 0 and drop every other branch.

        Rejected nodes stored below an accepted one are not freed but parked in the GRAVEYARD sequence: a freed
        cell there would be refilled by the next token out of position order, and llama.cpp's logits depend on
        cell order (docs/results.md), which would break equality with plain decoding. Nodes sit in
        tree order, so chains and paths through the first branch park nothing; `_flush` empties the graveyard."""
        lc, memory, n = self._lc, self._memory, len(path)
        accepted = set(path)
        for node in range(max(path)):
            if node not in accepted:
                pos = past_length + self._depths[node]
                lc.llama_memory_seq_cp(memory, self._leaf_of[node], GRAVEYARD, pos, pos + 1)
                self._parked += 1
        branch = self._leaf_of[path[-1]]
        if branch == 0:
            lc.llama_memory_seq_rm(memory, 0, past_length + n, -1)
        else:
            lc.llama_memory_seq_rm(memory, 0, past_length, -1)
            lc.llama_memory_seq_cp(memory, branch, 0, past_length, past_length + n)
        for other in range(1, self._branches):
            lc.llama_memory_seq_rm(memory, other, -1, -1)
        self._branches = 1
        self._length = past_length + n
        self._committed.extend(self._tree_tokens[i] for i in path)
        if self._parked > MAX_PARKED:
            self._flush()

    def _flush(self) -> None:
        """Empty the graveyard by prefilling the committed tokens again into a clean cache (rare)."""
        self.prefill(torch.tensor(self._committed))

    def truncate(self, length: int) -> None:
        if length < self._length:
            self._lc.llama_memory_seq_rm(self._memory, 0, length, -1)
            self._length = length
            del self._committed[length:]


_log_callback = None  # kept referenced: llama.cpp calls it from C


def silence_llama_logs(lc) -> None:
    """llama.cpp logs every load at INFO level on stderr; keep stderr for draftwise's own messages."""
    global _log_callback
    if _log_callback is None:
        _log_callback = lc.llama_log_callback(lambda level, text, user_data: None)
        lc.llama_log_set(_log_callback, ctypes.c_void_p(0))
