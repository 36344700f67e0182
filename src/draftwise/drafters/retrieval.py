"""Retrieval sources for drafting: a REST datastore (He et al., NAACL 2024) over an external corpus.

A datastore is one token array (every corpus sequence followed by a separator id that no token has) and its
suffix array, built with libdivsufsort (`pydivsufsort`), saved as .npy files that load memory-mapped, plus a
small meta.json. A query does what REST's DraftRetriever does: for suffix lengths from long to short, binary
search the suffix array for the context's trailing tokens; at the first length with matches, read the tokens
that follow (up to `max_matches` occurrences) and keep the most frequent continuation prefixes as a trie.

`draftwise datastore build` makes datastores from the target's own chat responses (distilled data), the Python
standard library's source, or a JSONL file.
"""

from __future__ import annotations

import json
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
from safetensors import safe_open
from torch import Tensor
from tqdm import tqdm

from draftwise.core.errors import DraftwiseError
from draftwise.core.files import atomic_directory
from draftwise.core.machine import cache_dir
from draftwise.core.tree import DraftTree

TOKENS_FILE, SUFFIX_ARRAY_FILE, META_FILE = "tokens.npy", "suffix_array.npy", "meta.json"
DEFAULT_MAX_TOKENS = 5_000_000


class Retrieved(NamedTuple):
    tree: DraftTree
    match: int  # how many trailing context tokens the retrieval matched: what most predicts its acceptance


class Retriever(Protocol):
    """Anything that proposes a retrieval tree continuing `tokens` (root = tokens[-1]): a REST datastore, prompt
    lookup. None when nothing matches."""

    def retrieve(self, tokens: Tensor, budget: int) -> Retrieved | None: ...


def frequent_prefix_tree(root: int, continuations: np.ndarray, budget: int) -> DraftTree:
    """The trie of the `budget - 1` most frequent prefixes of `continuations` ((k, C) ids, -1 after each row's
    end), as REST keeps its `num_draft` most frequent prefixes. A node's score is log(count / k).

    Prefix counts are vectorised: after a lexicographic sort, rows sharing a depth-d prefix are contiguous, so
    a group starts wherever the common prefix with the previous row is shorter than d.
    """
    k, width = continuations.shape
    if k == 0 or width == 0 or budget <= 1:
        return DraftTree.from_sequences(root, [])
    rows = continuations[np.lexsort(continuations.T[::-1])]
    lengths = (rows >= 0).sum(1)
    same = np.cumprod((rows[1:] == rows[:-1]) & (rows[1:] >= 0), axis=1).sum(1)
    common = np.concatenate([[0], same])  # common prefix length with the previous row
    counts, depths, firsts = [], [], []
    for d in range(1, width + 1):
        members = np.flatnonzero(lengths >= d)
        if members.size == 0:
            break
        starts = np.flatnonzero(common[members] < d)
        counts.append(np.diff(np.append(starts, members.size)))
        depths.append(np.full(starts.size, d))
        firsts.append(members[starts])
    if not counts:  # every continuation is empty
        return DraftTree.from_sequences(root, [])
    counts, depths, firsts = np.concatenate(counts), np.concatenate(depths), np.concatenate(firsts)
    # most frequent first, shallower first among equals: a prefix never ranks after one of its extensions
    order = np.lexsort((depths, -counts))[: budget - 1]
    prefixes = [tuple(rows[f, :d].tolist()) for f, d in zip(firsts[order], depths[order], strict=True)]
    count_of = dict(zip(prefixes, counts[order].tolist(), strict=True))
    # from_sequences gives a node the summed weight of the sequences through it; weighting each prefix by its
    # count minus its kept children's counts makes that sum the prefix's count, and the empty sequence's
    # weight makes the total k
    weights = dict(count_of)
    root_weight = float(k)
    for prefix, count in count_of.items():
        if len(prefix) == 1:
            root_weight -= count
        else:
            weights[prefix[:-1]] -= count
    return DraftTree.from_sequences(root, [(), *prefixes], [root_weight, *(weights[p] for p in prefixes)])


@dataclass
class Datastore:
    """A REST datastore: memory-mapped corpus tokens and suffix array, plus retrieval settings."""

    tokens: np.ndarray  # (n,) every sequence followed by `separator`
    suffix_array: np.ndarray  # (n,) start positions of the suffixes of `tokens` in lexicographic order
    meta: dict
    max_span: int = 16  # longest context suffix searched (REST's max_token_span)
    min_span: int = 2  # shortest
    max_matches: int = 1000  # occurrences read at the matched length (REST: 5000), spread evenly over them
    max_continuation: int = 10  # tokens read after each occurrence

    @property
    def separator(self) -> int:
        return int(self.meta["separator"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @classmethod
    def load(cls, path: str | Path, **settings) -> Datastore:
        """Open a datastore directory (memory-mapped: loading costs milliseconds whatever its size)."""
        path = Path(path)
        if not (path / META_FILE).is_file():
            raise DraftwiseError(f"'{path}' is not a datastore (no {META_FILE})")
        meta = json.loads((path / META_FILE).read_text())
        tokens = np.load(path / TOKENS_FILE, mmap_mode="r")
        suffix_array = np.load(path / SUFFIX_ARRAY_FILE, mmap_mode="r")
        return cls(tokens, suffix_array, meta, **settings)

    def suffix_ranges(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For every length ℓ from min(max_span, len(query)) down to min_span: the suffix-array rows [lo, hi)
        whose suffixes start with query[-ℓ:]. Returns (lengths, lo, hi).

        All 2·L lower/upper-bound binary searches run in lockstep, one vectorised step per halving."""
        lengths = np.arange(min(self.max_span, len(query)), self.min_span - 1, -1)
        if lengths.size == 0:
            return lengths, lengths, lengths
        n, width = len(self.tokens), int(lengths[0])
        cols = np.arange(width)
        valid = cols < lengths[:, None]  # (L, width): row i compares its first ℓ_i columns
        q = np.where(valid, query[np.clip(len(query) - lengths[:, None] + cols, 0, len(query) - 1)], 0)
        q, valid = np.concatenate([q, q]), np.concatenate([valid, valid])
        strict = np.arange(2 * lengths.size) < lengths.size  # lower bounds (suffix < q), then upper (suffix <= q)
        lo, hi = np.zeros(2 * lengths.size, np.int64), np.full(2 * lengths.size, n, np.int64)
        rows = np.arange(2 * lengths.size)
        while True:
            active = lo < hi
            if not active.any():
                break
            mid = (lo + hi) // 2
            start = self.suffix_array[np.minimum(mid, n - 1)].astype(np.int64)
            # reads past the end see the final separator, which already decided the comparison
            window = self.tokens[np.minimum(start[:, None] + cols, n - 1)].astype(np.int64)
            diff = np.where(valid, window - q, 0)
            sign = np.sign(diff[rows, (diff != 0).argmax(1)])  # first difference decides; 0 = equal prefix
            right = np.where(strict, sign < 0, sign <= 0)
            lo = np.where(active & right, mid + 1, lo)
            hi = np.where(active & ~right, mid, hi)
        return lengths, lo[: lengths.size], lo[lengths.size :]

    def match(self, tokens: Sequence[int] | Tensor | np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        """The longest suffix of `tokens` (between min_span and max_span) that occurs in the corpus followed
        by at least one more token of its sequence: (ℓ, occurrence positions, continuations (k, C), -1
        after each end). ℓ is 0 when nothing matches. At most `max_matches` occurrences, evenly spread over
        the matching suffix-array rows (REST reads the first k rows, which favours small token ids)."""
        query = np.asarray(tokens.tolist() if isinstance(tokens, Tensor) else tokens, dtype=np.int64)
        bad = np.flatnonzero((query < 0) | (query >= self.separator))
        query = query[bad[-1] + 1 :] if bad.size else query  # a suffix with an unknown id cannot match
        empty = np.zeros((0, self.max_continuation), np.int64)
        n = len(self.tokens)
        cols = np.arange(self.max_continuation)
        for length, lo, hi in zip(*self.suffix_ranges(query), strict=True):
            if hi <= lo:
                continue
            count = int(hi - lo)
            picked = lo + (np.arange(min(count, self.max_matches)) * count) // min(count, self.max_matches)
            starts = self.suffix_array[picked].astype(np.int64)
            window = self.tokens[np.minimum(starts[:, None] + length + cols, n - 1)].astype(np.int64)
            inside = np.cumprod(window != self.separator, axis=1).astype(bool)
            if inside[:, 0].any():
                return int(length), starts, np.where(inside, window, -1)
        return 0, np.zeros(0, np.int64), empty

    def retrieve(self, tokens: Tensor, budget: int) -> Retrieved | None:
        """REST's retrieval tree continuing tokens[-1], at most `budget` nodes; None when nothing matches."""
        length, _, continuations = self.match(tokens)
        if not length:
            return None
        return Retrieved(frequent_prefix_tree(int(tokens[-1]), continuations, budget), length)


def build_datastore(
    sequences: Iterable[Sequence[int]],
    out: str | Path,
    vocab_size: int,
    max_tokens: int | None = None,
    meta: dict | None = None,
) -> dict:
    """Concatenate `sequences` (each followed by the separator id `vocab_size`), suffix-sort them and write a
    datastore directory at `out` (replacing an older datastore there). Returns the meta written."""
    from pydivsufsort import divsufsort  # needed only to build a datastore, never to read one

    out = Path(out)
    check_replaceable(out)
    began = time.perf_counter()
    separator = vocab_size
    dtype = np.uint16 if separator < 2**16 else np.int32
    chunks, total, count = [], 0, 0
    for seq in sequences:
        ids = np.asarray(seq, dtype=np.int64)
        if max_tokens is not None:
            ids = ids[: max_tokens - total]
        if ids.size == 0:
            if max_tokens is not None and total >= max_tokens:
                break
            continue
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise DraftwiseError(f"token ids must lie in [0, {vocab_size}); got {ids.min()}..{ids.max()}")
        chunks.extend([ids.astype(dtype), np.array([separator], dtype)])
        total, count = total + ids.size, count + 1
    if not total:
        raise DraftwiseError("the corpus is empty: no tokens to build a datastore from")
    tokens = np.concatenate(chunks)
    print(f"sorting {tokens.size:,} suffixes ...", file=sys.stderr, flush=True)
    suffix_array = divsufsort(tokens)
    suffix_array = suffix_array.astype(np.int32 if tokens.size < 2**31 else np.int64, copy=False)
    with atomic_directory(out) as staging:
        np.save(staging / TOKENS_FILE, tokens)
        np.save(staging / SUFFIX_ARRAY_FILE, suffix_array)
        meta = {
            **(meta or {}),
            "vocab_size": vocab_size,
            "separator": separator,
            "dtype": np.dtype(dtype).name,
            "num_tokens": int(total),
            "num_sequences": count,
            "bytes": {
                "tokens": (staging / TOKENS_FILE).stat().st_size,
                "suffix_array": (staging / SUFFIX_ARRAY_FILE).stat().st_size,
            },
            "build_seconds": round(time.perf_counter() - began, 3),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))
        check_replaceable(out)  # again: the directory may have changed during the sort
    return meta


def is_datastore(directory: Path) -> bool:
    """A directory holding exactly a datastore's files, with a meta.json that says so."""
    if not directory.is_dir() or {p.name for p in directory.iterdir()} != {TOKENS_FILE, SUFFIX_ARRAY_FILE, META_FILE}:
        return False
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and {"separator", "num_tokens", "vocab_size"} <= meta.keys()


def check_replaceable(out: Path) -> None:
    """Only an empty directory or an older datastore may be replaced: distill and log-rounds directories have a
    meta.json too, and their data must never be deleted."""
    if out.exists() and not out.is_dir():
        raise DraftwiseError(f"'{out}' exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not is_datastore(out):
        raise DraftwiseError(f"'{out}' exists and is not a datastore (its files would be lost); choose another --out")


# --- corpora -------------------------------------------------------------------------------------------


def chat_corpus(distill_dir: Path) -> Iterator[list[int]]:
    """The target's own greedy responses (ids[response_from:]) from `draftwise distill` shards. Only the
    token ids are read, never the (large) feature tensors."""
    shards = sorted(Path(distill_dir).glob("shard_*.safetensors"))
    if not shards:
        raise DraftwiseError(f"no distilled data in {distill_dir}; build it with `draftwise distill`")
    for path in tqdm(shards, desc="reading shards", unit="shard"):
        with safe_open(path, framework="pt") as shard:
            names = shard.keys()  # a safetensors file handle, not a dict: it cannot be iterated
            for key in sorted(k.removesuffix(".ids") for k in names if k.endswith(".ids")):
                ids = shard.get_tensor(f"{key}.ids")
                start = int(shard.get_tensor(f"{key}.response_from")[0])
                yield ids[start:].tolist()


def stdlib_sources() -> list[Path]:
    """Python files of this interpreter's standard library, without test suites and installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(
        p
        for p in root.rglob("*.py")
        if not skip.intersection(p.relative_to(root).parts[:-1]) and not p.name.startswith("test_")
    )


def text_corpus(texts: Iterable[str], tokenizer, total: int | None, desc: str, unit: str) -> Iterator[list[int]]:
    for text in tqdm(texts, total=total, desc=desc, unit=unit):
        if text:
            yield tokenizer(text, add_special_tokens=False)["input_ids"]


def jsonl_texts(path: Path) -> Iterator[str]:
    number = 0
    with path.open(encoding="utf-8") as lines:
        try:
            for number, line in enumerate(lines, 1):  # noqa: B007 (the error names the line)
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise DraftwiseError(f'{path}:{number}: expected a JSON object with a "text" field') from exc
                if not isinstance(text, str):
                    raise DraftwiseError(f'{path}:{number}: "text" must be a string')
                yield text
        except UnicodeDecodeError as exc:
            raise DraftwiseError(f"{path} is not UTF-8 text (near line {number + 1}: {exc.reason})") from exc


# --- where datastores live -----------------------------------------------------------------------------------


def default_datastore_dir(name: str) -> Path:
    return cache_dir() / "datastores" / name


def resolve_datastore(name_or_path: str | Path) -> Path:
    """A datastore directory from a name (under the cache) or a path; a clear error when it is not built."""
    path = Path(name_or_path).expanduser()
    if (path / META_FILE).is_file():
        return path
    named = default_datastore_dir(str(name_or_path))
    if (named / META_FILE).is_file():
        return named
    corpus = name_or_path if str(name_or_path) in ("chat", "code") else "chat|code|FILE.jsonl"
    raise DraftwiseError(
        f"no datastore '{name_or_path}' (looked in {path} and {named}); build one with "
        f"`draftwise datastore build --corpus {corpus}`"
    )
