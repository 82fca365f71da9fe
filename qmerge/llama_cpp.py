"""The one binding to llama.cpp (llama-cpp-python): import guard, quiet stderr, logits, quantize.

Quantization runs in a child process: llama.cpp's quantizer is one long C call that a signal cannot stop,
so Ctrl-C (or SIGTERM) stops the child instead, and nothing it wrote survives.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .children import child_env, die_with_parent
from .errors import DependencyError, InputError, OutputError, UnsupportedError


def require(why: str):
    """The llama_cpp module, or a DependencyError saying what needs it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise DependencyError(f"{why} needs llama-cpp-python: pip install llama-cpp-python.") from e
    return llama_cpp


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Redirect fd 2 to /dev/null for the block (llama.cpp logs there), unless QMERGE_DEBUG is set."""
    if os.environ.get("QMERGE_DEBUG"):
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@functools.cache
def _cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Linux: /proc/cpuinfo's flags)."""
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False


@contextlib.contextmanager
def without_extra_buffers(llama_cpp) -> Iterator[None]:
    """Models created in the block load their weights into plain CPU buffers (llama_model_params'
    use_extra_bufts off) on CPUs with AMX: llama.cpp 0.3.36's AMX matrix kernel, which those buffers
    select for Q8_0/Q4_0 weights, crashes the process (general protection fault in libggml-cpu) on small
    models. Elsewhere the block changes nothing."""
    if not _cpu_has_amx():
        yield
        return
    lib = llama_cpp.llama_cpp
    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def llama(llama_cpp, **kwargs):
    """llama_cpp.Llama(**kwargs), on CPU buffers that run on every CPU (without_extra_buffers)."""
    with without_extra_buffers(llama_cpp):
        return llama_cpp.Llama(**kwargs)


def load(path: Path, n_ctx: int, logits_all: bool = False, lora: Path | None = None):
    """A llama.cpp model for `path` (f32 KV cache, quiet) with an optional LoRA GGUF applied, or an
    InputError that says llama.cpp refused it."""
    llama_cpp = require("running a GGUF file")
    try:
        with quiet_native_stderr():
            return llama(
                llama_cpp,
                model_path=str(path),
                lora_path=str(lora) if lora else None,
                n_ctx=max(n_ctx, 16),
                n_batch=max(n_ctx, 16),
                logits_all=logits_all,
                type_k=llama_cpp.GGML_TYPE_F32,
                type_v=llama_cpp.GGML_TYPE_F32,
                n_threads=threads(),
                verbose=False,
                seed=0,
            )
    except (ValueError, RuntimeError) as e:
        raise InputError(
            f"{path}{' with ' + str(lora) if lora else ''}: llama.cpp cannot load this GGUF file ({e}). "
            "Re-export it, or run with QMERGE_DEBUG=1 "
            "to see llama.cpp's log."
        ) from e


def gguf_logits(
    path: Path, tokens: torch.Tensor, lengths: list[int] | None = None, lora: Path | None = None
) -> torch.Tensor:
    """Full fp32 logits [n, seq, vocab] from llama.cpp for each sequence of `tokens` (its first lengths[i]
    tokens; the rest of the row is zeros), f32 KV cache."""
    seq = tokens.shape[1]
    llm = load(path, seq, logits_all=True, lora=lora)
    outs = []
    try:
        for i, row in enumerate(tokens.tolist()):
            row = row[: lengths[i]] if lengths else row
            llm.reset()
            llm.eval(row)
            scores = torch.from_numpy(llm.scores[: len(row)].copy())
            outs.append(torch.cat([scores, scores.new_zeros(seq - len(row), scores.shape[1])]))
    finally:
        llm.close()
    return torch.stack(outs)


def gguf_complete(
    path: Path, records: list[dict], prompts: list[str], max_new_tokens: int, lora: Path | None = None
) -> list[str]:
    """Greedy completions by llama.cpp with the GGUF's own tokenizer: chat records through the chat
    template stored in the GGUF, others from their prompt text."""
    llm = load(path, 2048, lora=lora)
    out = []
    try:
        for row, prompt in zip(records, prompts, strict=True):
            with quiet_native_stderr():
                if "messages" in row:
                    msgs = row["messages"]
                    last = max(i for i, m in enumerate(msgs) if m.get("role") == "assistant")
                    r = llm.create_chat_completion(
                        messages=msgs[:last], max_tokens=max_new_tokens, temperature=0.0
                    )
                    text = r["choices"][0]["message"]["content"] or ""
                else:
                    r = llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0)
                    text = r["choices"][0]["text"]
            out.append(text.strip())
    finally:
        llm.close()
    return out


def gguf_vocab_size(path: Path) -> int | None:
    """The number of tokens a GGUF file's vocabulary holds (None without one)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception:  # noqa: BLE001 - not a GGUF gguf-py reads: llama.cpp's loader says why
        return None
    field = reader.fields.get("tokenizer.ggml.tokens")
    return len(field.data) if field is not None else None


def quantize(
    src: Path, dst: Path, gguf_type: str, token_embedding: str | None = None, output: str | None = None
) -> None:
    """Quantize GGUF `src` into `dst` with llama.cpp's own quantizer (K-quants, legacy and IQ4 types),
    in a child process that an interrupt stops; the token embedding and the output layer as the GGML types
    named (llama-quantize's --token-embedding-type / --output-tensor-type), else as llama.cpp's rule says."""
    llama_cpp = require(f"--gguf-type {gguf_type} (llama.cpp's quantizer)")
    if getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}", None) is None:
        raise UnsupportedError(f"the installed llama-cpp-python has no {gguf_type} quantizer.")
    proc = subprocess.Popen(
        quantize_command(src, dst, gguf_type, token_embedding, output),
        env=child_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _, err = proc.communicate()
    except BaseException:  # KeyboardInterrupt, SystemExit from SIGTERM: stop the C call with the child
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0 or not dst.exists():
        last = [line for line in err.decode("utf-8", "replace").splitlines() if line.strip()][-3:]
        detail = " | ".join(last)
        free = shutil.disk_usage(dst.parent).free
        if "No space left" in detail or "ENOSPC" in detail or free < src.stat().st_size // 4:
            raise OutputError(
                f"{dst.parent}: disk full while llama.cpp quantized the file. Free space and retry."
            )
        raise UnsupportedError(
            f"llama.cpp could not quantize to {gguf_type} (exit {proc.returncode}): {detail or 'no message'}"
        )


def quantize_command(
    src: Path, dst: Path, gguf_type: str, token_embedding: str | None = None, output: str | None = None
) -> list[str]:
    """The child process that runs llama.cpp's quantizer (this module, run as a script)."""
    types = [token_embedding or "-", output or "-"]
    return [sys.executable, "-m", "qmerge.llama_cpp", "quantize", str(src), str(dst), gguf_type, *types]


def _quantize_here(src: str, dst: str, gguf_type: str, token_embedding: str = "-", output: str = "-") -> int:
    import ctypes

    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    params.nthread = max(1, min(8, os.cpu_count() or 1))
    if token_embedding != "-":
        params.token_embedding_type = int(gguf.GGMLQuantizationType[token_embedding.upper()])
    if output != "-":
        params.output_tensor_type = int(gguf.GGMLQuantizationType[output.upper()])
    return int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))


def quantize_rows(qtype: int, rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's own quantizer for one tensor (ggml_quantize_chunk): the bytes of GGML type `qtype` for
    float32 rows [n, k], with `importance` (float32 [k], the imatrix: mean squared activation of each
    column) where given. In process: one call per tensor, no signal handling needed."""
    import ctypes

    lib = _ggml_base()
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n, k = rows.shape
    size = lib.ggml_row_size(qtype, k) * n
    out = np.empty(size, dtype=np.uint8)
    imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    written = lib.ggml_quantize_chunk(
        qtype,
        rows.ctypes.data_as(ctypes.c_void_p),
        out.ctypes.data_as(ctypes.c_void_p),
        0,
        n,
        k,
        None if imp is None else imp.ctypes.data_as(ctypes.c_void_p),
    )
    if written != size:
        raise UnsupportedError(
            f"llama.cpp quantized {written} bytes of GGML type {qtype} where {size} were due."
        )
    return out


@functools.lru_cache(maxsize=1)
def _ggml_base():
    """libggml-base from llama-cpp-python's wheel, with the two functions quantize_rows calls typed."""
    import ctypes

    llama_cpp = require("quantizing with llama.cpp's importance-matrix quantizer")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_row_size.restype, lib.ggml_row_size.argtypes = ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3
    lib.ggml_quantize_chunk.argtypes += [ctypes.c_void_p]
    return lib


if __name__ == "__main__" and sys.argv[1:2] == ["quantize"]:
    die_with_parent()
    rc = _quantize_here(*sys.argv[2:7])
    if rc != 0:
        print(f"llama_model_quantize returned {rc}", file=sys.stderr)
    sys.exit(1 if rc else 0)
