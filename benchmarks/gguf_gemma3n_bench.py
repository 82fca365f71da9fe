"""GGUF export of Gemma 3n at E2B's shape: peak memory against the largest tensor the GGUF holds, the
per-layer embedding table (262,144 x 7,680 stored, padded to the 262,400-token vocabulary), each step in a
fresh process (wall time, peak RSS).

The synthetic checkpoint has Gemma 3n E2B's text shapes (30 layers of width 2048, feed-forward 8192, 8 heads
of 256 with 2 KV heads, AltUp, LAuReL, per-layer inputs of 256, KV shared by the last 10 layers, whose keys
and values are stored as the releases store them), in bf16 with a small SentencePiece tokenizer; the adapter
is a rank-16 LoRA on the attention projections.

Usage: python benchmarks/gguf_gemma3n_bench.py [--size e2b|tiny] [--gguf-type f16|q8_0|...] [--workdir DIR]
                                               [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_bench import add_sentencepiece  # noqa: E402
from gguf_moe_bench import ATTENTION, attention_adapter, timed_gguf_export  # noqa: E402

SHAPES = {
    "e2b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=30, vocab_size=262400,
                vocab_size_per_layer_input=262144, num_kv_shared_layers=10),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=22, vocab_size=1000,
                 vocab_size_per_layer_input=900, num_kv_shared_layers=2),
}  # fmt: skip


def config(size: str) -> dict:
    s = SHAPES[size]
    n = s["num_hidden_layers"]
    types = ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(n)]
    if size == "tiny":  # layer 19 global, as llama.cpp reuses it
        types[19], types[20:] = "full_attention", ["sliding_attention", "full_attention"]
    return dict(
        s,
        architectures=["Gemma3nForCausalLM"],
        model_type="gemma3n_text",
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=256 if size == "e2b" else 16,
        hidden_size_per_layer_input=256,
        laurel_rank=64,
        activation_sparsity_pattern=[0.95] * 10 + [0.0] * (n - 10),
        layer_types=types,
        sliding_window=512,
        max_position_embeddings=32768,
        dtype="bfloat16",
    )


def shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, ff, n, ple = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], 256
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    out = {
        "model.embed_tokens.weight": (c["vocab_size"], h),
        "model.embed_tokens_per_layer.weight": (c["vocab_size_per_layer_input"], n * ple),
        "model.per_layer_model_projection.weight": (n * ple, h),
        "model.per_layer_projection_norm.weight": (ple,),
        "model.norm.weight": (h,),
    }
    for k in range(3):
        out[f"model.altup_projections.{k}.weight"] = out[f"model.altup_unembed_projections.{k}.weight"] = (
            h,
            h,
        )
    for i in range(n):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.o_proj.weight": (h, q)}
        out |= {p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h)}
        out |= {
            p + "self_attn.q_norm.weight": (c["head_dim"],),
            p + "self_attn.k_norm.weight": (c["head_dim"],),
        }
        out |= {p + f"mlp.{m}_proj.weight": (ff, h) for m in ("gate", "up")} | {
            p + "mlp.down_proj.weight": (h, ff)
        }
        out |= {p + "laurel.linear_left.weight": (64, h), p + "laurel.linear_right.weight": (h, 64)}
        out |= {p + "per_layer_input_gate.weight": (ple, h), p + "per_layer_projection.weight": (h, ple)}
        out |= {p + "altup.correction_coefs.weight": (4, 4), p + "altup.prediction_coefs.weight": (16, 4)}
        out |= {p + "altup.modality_router.weight": (4, h), p + "altup.correct_output_scale": (h,)}
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_per_layer_input_norm", "altup.router_norm",
                     "laurel.post_laurel_norm"):  # fmt: skip
            out[p + norm + ".weight"] = (h,)
    return out


def build(work: Path, size: str, rank: int = 16) -> tuple[Path, Path, dict]:
    """The bf16 base and the attention adapter in work/; their paths and the shapes."""
    from qmerge.io.safetensors import PlannedTensor, StreamingSafetensorsWriter

    base, adapter = work / "base-bf16", work / "adapter"
    base.mkdir(parents=True)
    c = config(size)
    (base / "config.json").write_text(json.dumps(c))
    table = shapes(c)
    entries = [PlannedTensor(n, "BF16", shp) for n, shp in sorted(table.items())]
    w = StreamingSafetensorsWriter(base / "model.safetensors", entries, {"format": "pt"})
    g = torch.Generator().manual_seed(0)
    for e in entries:
        ones = e.name.endswith(("norm.weight", "_scale"))
        w.write(
            e.name, (torch.ones(e.shape) if ones else torch.randn(e.shape, generator=g) * 0.02).bfloat16()
        )
    w.close()
    shared = c["num_hidden_layers"] - c["num_kv_shared_layers"]  # the shared layers have no keys or values
    names = [
        n
        for n in table
        if n.split(".")[-2] in ATTENTION
        and (int(n.split(".")[2]) < shared or n.split(".")[-2] in ("q_proj", "o_proj"))
    ]
    attention_adapter(adapter, base, names, table, rank, g)
    add_sentencepiece(base)
    return base, adapter, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="e2b", choices=sorted(SHAPES))
    ap.add_argument("--gguf-type", default="f16", help="f16 (default), bf16, q8_0, f32")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qmerge-gguf-gemma3n-bench-", dir=args.workdir))
    try:
        base, adapter, table = build(work, args.size)
        c = config(args.size)
        bytes_per = {"f32": 4, "q8_0": 4}.get(args.gguf_type, 2)  # merged in: q8_0 from fp32
        largest = c["vocab_size"] * c["num_hidden_layers"] * 256 * bytes_per  # the padded per-layer table
        out = work / "qmerge.gguf"
        result: dict = {
            "size": args.size,
            "parameters": sum(torch.Size(v).numel() for v in table.values()),
            "largest_tensor_gib": largest / 2**30,
            "base_gib": sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**30,
            "gguf_type": args.gguf_type,
            "qmerge_export": timed_gguf_export(adapter, base, out, args.gguf_type),
        }
        if out.exists():
            result["gguf_gib"] = out.stat().st_size / 2**30
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
