"""Image embeddings by llama.cpp's multimodal library (mtmd, through llama-cpp-python's bindings): a text
GGUF and its vision projector encode one RGB image as llama.cpp's server would, the reference the projector
tests compare transformers with."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from qmerge.llama_cpp import load, quiet_native_stderr

IMAGE_CHUNK = 1  # MTMD_INPUT_CHUNK_TYPE_IMAGE


def image_embeddings(gguf: Path, mmproj: Path, image: np.ndarray) -> np.ndarray:
    """[tokens, hidden] float32: what the projector gives the language model for `image` ([h, w, 3] uint8)."""
    import llama_cpp.mtmd_cpp as m

    llm = load(gguf, 64)
    params = m.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings = False, 2, False
    with quiet_native_stderr():
        ctx = m.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
    assert ctx, f"mtmd cannot load {mmproj}"
    h, w, _ = image.shape
    pixels = (ctypes.c_ubyte * image.size).from_buffer_copy(np.ascontiguousarray(image).tobytes())
    bitmap = m.mtmd_bitmap_init(w, h, pixels)
    chunks = m.mtmd_input_chunks_init()
    marker = ctypes.create_string_buffer(m.mtmd_default_marker())
    text = m.mtmd_input_text()
    text.text, text.text_len = ctypes.cast(marker, ctypes.c_char_p), len(marker.value)
    text.add_special, text.parse_special = False, True
    try:
        with quiet_native_stderr():
            assert m.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (ctypes.c_void_p * 1)(bitmap), 1) == 0
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                if m.mtmd_input_chunk_get_type(chunk) != IMAGE_CHUNK:
                    continue
                n = m.mtmd_input_chunk_get_n_tokens(chunk)
                assert m.mtmd_encode_chunk(ctx, chunk) == 0
                out = ctypes.cast(m.mtmd_get_output_embd(ctx), ctypes.POINTER(ctypes.c_float))
                return np.ctypeslib.as_array(out, shape=(n * llm.n_embd(),)).reshape(n, -1).copy()
        raise AssertionError("mtmd made no image chunk")
    finally:
        m.mtmd_input_chunks_free(chunks)
        m.mtmd_bitmap_free(bitmap)
        m.mtmd_free(ctx)
        llm.close()
