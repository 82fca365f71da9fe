"""Drift check: a candidate (merged directory, NF4 export, GGUF) against the unmerged QLoRA model.

metrics.py is pure (statistics of two sets of logits); reference.py builds the unmerged model with
transformers, bitsandbytes and PEFT; candidates.py runs a candidate in the engine that would serve it;
check.py wires them and applies the gate.
"""
