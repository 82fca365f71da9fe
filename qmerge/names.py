"""The names the command line offers as choices, in one torch-free place, so that `--help`, `--version` and
usage errors answer without importing torch. The modules that act on them read these tuples (dtypes keys its
table by DTYPES, the GGUF writer checks GGUF_TENSOR_TYPES, the pipeline MERGE_BASES)."""

from __future__ import annotations

# --dtype / --quant-dtype / --nf4-compute-dtype / --compute-dtype
DTYPES = ("bf16", "fp16", "fp32")
# --merge-base: the NF4 weights training saw, or the 16-bit base
MERGE_BASES = ("dequantized", "original")
# GGUF types qmerge writes itself, and those llama.cpp's quantizer makes from an intermediate GGUF (of these,
# qmerge writes the calibrated ones itself too)
GGUF_DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_LLAMA_CPP_TYPES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
GGUF_LLAMA_CPP_TYPES += ("q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "iq4_xs")
GGUF_OWN_CALIBRATED_TYPES = ("iq4_xs", "iq4_nl", "q4_0")
# GGML types llama.cpp's quantizer can give the token embedding or the output layer (llama-quantize's
# --token-embedding-type / --output-tensor-type)
GGUF_TENSOR_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k")
GGUF_TENSOR_TYPES += ("q5_1", "q5_0", "q4_1", "q4_0", "iq4_xs", "iq4_nl")
