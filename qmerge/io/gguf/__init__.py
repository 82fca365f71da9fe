"""GGUF files for llama.cpp: one record per architecture (arch.py), RoPE scaling (rope.py), the
vocabulary (vocab.py), and the streaming file writer (writer.py)."""
