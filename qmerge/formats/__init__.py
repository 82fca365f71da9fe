"""Output formats, one small module each, all written by the one streaming loop in write.py:
plain safetensors (bf16/fp16/fp32), requantized NF4, and GGUF."""
