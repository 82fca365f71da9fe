"""llama.cpp's importance matrix as a GGUF file (`llama-imatrix -o imatrix.gguf`), for `llama-quantize
--imatrix`: general.type "imatrix", the datasets, chunk count and size, and per weight `NAME.in_sum2` (the sum
over calibration tokens of each input column's squared activation, F32 [1, n_in]) and `NAME.counts` (the
number of tokens, F32 [1, 1]), NAME the weight's GGUF tensor name. Key and tensor names as llama.cpp's
tools/imatrix writes them (gguf-py's Keys.IMatrix)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ... import __version__
from .writer import QMERGE_KEY

CHUNK_SIZE = 512  # llama-imatrix's default context: the chunk count is tokens / this


def write_imatrix(path: Path, arch: str, sums: dict[str, np.ndarray], tokens: int, dataset: str) -> None:
    """Write `sums` ({GGUF weight name: float32[n_in] sum of squares over `tokens` tokens}) at `path`."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.IMATRIX)
    w.add_string(QMERGE_KEY, __version__)
    w.add_array(gguf.Keys.IMatrix.DATASETS, [dataset])
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, max(1, tokens // CHUNK_SIZE))
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, CHUNK_SIZE)
    for name in sorted(sums):
        w.add_tensor(name + ".in_sum2", np.asarray(sums[name], dtype=np.float32).reshape(1, -1))
        w.add_tensor(name + ".counts", np.full((1, 1), float(tokens), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
