"""Remake the hostile inputs in this folder: python tests/hostile/make_hostile.py

clean/ holds a micro Llama (1 layer, hidden 32, vocab 64) in bf16 (base16) and as transformers saves it in
bitsandbytes 4-bit form (base4), and a LoRA adapter made by PEFT on it. Each folder in cases/ holds the
files that differ from clean/ (laid over a copy of it) and case.json: the command line a careless user or an
attacker runs, the exit code qmerge must give, and a pattern its one-line message must match. The files
are small on purpose (under 30 KB each) so that all of them can be committed.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CLEAN, CASES = HERE / "clean", HERE / "cases"
MERGE4 = ["merge", "{adapter}", "--base", "{base4}", "-o", "{out}"]
MERGE16 = ["merge", "{adapter}", "--base", "{base16}", "-o", "{out}"]
INSPECT4 = ["inspect", "{base4}"]
Q = "model.layers.0.self_attn.q_proj"


def make_clean() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    shutil.rmtree(CLEAN, ignore_errors=True)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(str(CLEAN / "base16"))
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(CLEAN / "base16"), quantization_config=bnb, device_map="cpu"
    )
    model.save_pretrained(str(CLEAN / "base4"))
    torch.manual_seed(1)
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(CLEAN / "base16"), dtype=torch.float32),
        LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False),
    )
    peft.save_pretrained(str(CLEAN / "adapter"))
    cfg_path = CLEAN / "adapter" / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    adapter_cfg["base_model_name_or_path"] = "../base16"
    cfg_path.write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True) + "\n")
    (CLEAN / "adapter" / "README.md").unlink(missing_ok=True)


# ---- safetensors surgery -------------------------------------------------------------------------------


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: dict | str, data: bytes) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def edited(src: str, edit) -> bytes:
    """The clean file `src` (e.g. "adapter/adapter_model.safetensors") with edit(header, data) applied."""
    header, data = split(CLEAN / src)
    out = edit(header, data)
    return out if isinstance(out, bytes) else join(*out)


def state_edit(**changes):
    """Edit q_proj's quant-state JSON in base4 (keeping the file's tiling)."""

    def edit(header, data):
        key = f"{Q}.weight.quant_state.bitsandbytes__nf4"
        s, e = header[key]["data_offsets"]
        state = json.loads(data[s:e])
        state.update(changes)
        blob = json.dumps(state).encode() if not isinstance(changes.get("_raw"), bytes) else changes["_raw"]
        return _replace_tensor(header, data, key, blob, "U8", [len(blob)])

    return edit


def _replace_tensor(header: dict, data: bytes, key: str, blob: bytes, dtype: str, shape: list) -> tuple:
    """Re-lay the data buffer with `key` holding `blob` (everything else as it was)."""
    parts = {
        k: data[v["data_offsets"][0] : v["data_offsets"][1]] for k, v in header.items() if k != "__metadata__"
    }
    parts[key] = blob
    new, pos, out = {}, 0, b""
    if "__metadata__" in header:
        new["__metadata__"] = header["__metadata__"]
    for k, v in header.items():
        if k == "__metadata__":
            continue
        b = parts[k]
        info = dict(v)
        if k == key:
            info["dtype"], info["shape"] = dtype, shape
        info["data_offsets"] = [pos, pos + len(b)]
        new[k] = info
        out += b
        pos += len(b)
    return new, out


# ---- the cases -----------------------------------------------------------------------------------------


def cases() -> dict[str, dict]:
    A = "adapter/adapter_model.safetensors"
    B4 = "base4/model.safetensors"
    qa, ka = (
        f"base_model.model.{Q}.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight",
    )

    def overlap(h, d):
        h[qa]["data_offsets"] = list(h[ka]["data_offsets"])  # q_proj's A would read k_proj's bytes
        return h, d

    def gap(h, d):
        for v in h.values():
            if isinstance(v, dict) and "data_offsets" in v:
                v["data_offsets"] = [v["data_offsets"][0] + 8, v["data_offsets"][1] + 8]
        return h, bytes(8) + d

    def duplicate(h, d):
        text = json.dumps(h, separators=(",", ":"))
        first = json.dumps({qa: h[qa]}, separators=(",", ":"))[1:-1]
        return join(text[:-1] + "," + first + "}", d)

    def set_entry(field, value, key=qa):
        def edit(h, d):
            h[key][field] = value
            return h, d

        return edit

    def config(path, **changes):
        cfg = json.loads((CLEAN / path).read_text())
        cfg.update(changes)
        return json.dumps(cfg, indent=2).encode()

    def adapter_cfg(**changes):
        return config("adapter/adapter_config.json", **changes)

    def packed_short(h, d):
        key = f"{Q}.weight"
        s, e = h[key]["data_offsets"]
        return _replace_tensor(h, d, key, d[s : e - 16], "U8", [(e - s - 16), 1])

    def absmax_short(h, d):
        key = f"{Q}.weight.absmax"
        s, e = h[key]["data_offsets"]
        return _replace_tensor(h, d, key, d[s : e - 1], "U8", [e - s - 1])

    def lm_head_replacement(rows: int, cols: int):
        """A modules_to_save lm_head of [rows, cols] appended to the adapter."""

        def edit(h, d):
            blob = torch.zeros(rows, cols, dtype=torch.float32).numpy().tobytes()
            h["base_model.model.lm_head.weight"] = {
                "dtype": "F32",
                "shape": [rows, cols],
                "data_offsets": [len(d), len(d) + len(blob)],
            }
            return h, d + blob

        return edit

    return {
        # safetensors headers (the adapter)
        "header-overlapping-offsets": dict(
            files={A: edited(A, overlap)}, args=MERGE4, message="overlaps the tensor before it"
        ),
        "header-duplicate-key": dict(files={A: edited(A, duplicate)}, args=MERGE4, message="appears twice"),
        "header-gap": dict(files={A: edited(A, gap)}, args=MERGE4, message="leaves a gap"),
        "header-truncated": dict(
            files={A: (CLEAN / A).read_bytes()[:-100]}, args=MERGE4, message="truncated"
        ),
        "header-trailing-bytes": dict(
            files={A: (CLEAN / A).read_bytes() + b"x" * 64}, args=MERGE4, message="bytes appended"
        ),
        "header-offsets-as-strings": dict(
            files={A: edited(A, set_entry("data_offsets", ["0", "64"]))}, args=MERGE4, message="data_offsets"
        ),
        "header-negative-shape": dict(
            files={A: edited(A, set_entry("shape", [-2, 32]))}, args=MERGE4, message="non-negative integers"
        ),
        "header-huge-shape": dict(
            files={A: edited(A, set_entry("shape", [10**6, 10**6]))},
            args=["inspect", "{adapter}"],
            message="needs 4000000000000 bytes",
        ),
        "header-unknown-dtype": dict(
            files={A: edited(A, set_entry("dtype", "F128"))}, args=MERGE4, message="dtype 'F128'"
        ),
        "header-length-past-end": dict(
            files={A: struct.pack("<Q", 10**9) + b"{}"}, args=MERGE4, message="corrupt or truncated"
        ),
        "header-not-json": dict(
            files={A: join("{not json", b"")}, args=MERGE4, message="corrupt safetensors header"
        ),
        "header-a-list": dict(files={A: join("[1, 2, 3]", b"")}, args=MERGE4, message="not a JSON object"),
        # bitsandbytes quant states (the 4-bit base)
        "state-blocksize-0": dict(
            files={B4: edited(B4, state_edit(blocksize=0))}, args=MERGE4, message="blocksize 0"
        ),
        "state-blocksize-7": dict(
            files={B4: edited(B4, state_edit(blocksize=7))}, args=INSPECT4, message="blocksize 7"
        ),
        "state-quant-type": dict(
            files={B4: edited(B4, state_edit(quant_type="int4"))}, args=MERGE4, message="quant_type 'int4'"
        ),
        "state-dtype-garbage": dict(
            files={B4: edited(B4, state_edit(dtype="float8"))}, args=MERGE4, message="dtype 'float8'"
        ),
        "state-offset-garbage": dict(
            files={B4: edited(B4, state_edit(nested_offset="abc"))},
            args=MERGE4,
            message="nested_offset 'abc'",
        ),
        "state-not-utf8": dict(
            files={B4: edited(B4, state_edit(_raw=b"\xff\xfe{"))}, args=MERGE4, message="not UTF-8 JSON"
        ),
        "state-shape-disagrees-with-config": dict(
            files={B4: edited(B4, state_edit(shape=[16, 64]))},
            args=MERGE4,
            message="config.json does not match",
        ),
        "state-packed-truncated": dict(
            files={B4: edited(B4, packed_short)}, args=MERGE4, message="bytes of packed codes"
        ),
        "state-absmax-short": dict(files={B4: edited(B4, absmax_short)}, args=MERGE4, message="needs 16"),
        # adapter_config.json
        "adapter-r-0": dict(
            files={"adapter/adapter_config.json": adapter_cfg(r=0)}, args=MERGE4, message="r is 0"
        ),
        "adapter-r-string": dict(
            files={"adapter/adapter_config.json": adapter_cfg(r="eight")}, args=MERGE4, message="r is 'eight'"
        ),
        "adapter-alpha-nan": dict(
            files={"adapter/adapter_config.json": adapter_cfg(lora_alpha=float("nan"))},
            args=MERGE4,
            message="lora_alpha is nan",
        ),
        "adapter-rank-pattern-regex": dict(
            files={"adapter/adapter_config.json": adapter_cfg(rank_pattern={"q_proj(": 4})},
            args=MERGE4,
            message="not a valid regular expression",
        ),
        "adapter-alpha-pattern-string": dict(
            files={"adapter/adapter_config.json": adapter_cfg(alpha_pattern={"q_proj": "big"})},
            args=MERGE4,
            message="alpha_pattern",
        ),
        "adapter-replacement-wrong-shape": dict(
            files={A: edited(A, lm_head_replacement(64, 16))}, args=MERGE4, message="replaces lm_head"
        ),
        "adapter-replacement-other-vocabulary": dict(
            files={A: edited(A, lm_head_replacement(10, 32))},
            args=MERGE16,
            message="vocabulary sizes would disagree",
        ),
        "adapter-targets-select-nothing": dict(
            files={"adapter/adapter_config.json": adapter_cfg(target_modules=["c_attn", "c_proj"])},
            args=MERGE4,
            message="select none of the 7 modules",
        ),
        # config.json against the tensors
        "config-more-layers": dict(
            files={"base4/config.json": config("base4/config.json", num_hidden_layers=2)},
            args=MERGE4,
            message="the weights lack",
        ),
        "config-fewer-layers": dict(
            files={"base16/config.json": config("base16/config.json", num_hidden_layers=0)},
            args=MERGE16,
            message="config.json",
        ),
        "config-hidden-size": dict(
            files={"base16/config.json": config("base16/config.json", hidden_size=64)},
            args=MERGE16,
            message="config.json does not match",
        ),
        "config-vocab-size": dict(
            files={"base4/config.json": config("base4/config.json", vocab_size=96)},
            args=["export", "{base4}", "--to", "gguf", "-o", "{out}.gguf"],
            message="config.json does not match",
        ),
    }


def main() -> None:
    make_clean()
    shutil.rmtree(CASES, ignore_errors=True)
    for name, case in cases().items():
        d = CASES / name
        for rel, blob in case["files"].items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes(blob)
        spec = {"args": case["args"], "exit": case.get("exit", 1), "message": case["message"]}
        (d / "case.json").write_text(json.dumps(spec, indent=1) + "\n")
    rows = [
        f"| `{name}` | {', '.join(f'`{r}`' for r in case['files'])} | `qmerge {' '.join(case['args'])}` | "
        f"{case.get('exit', 1)} | {case['message']} |"
        for name, case in cases().items()
    ]
    (HERE / "README.md").write_text(
        "# Hostile inputs\n\n"
        + (__doc__ or "").split("\n\n", 1)[1]
        + "\n| case | files laid over clean/ | command | exit | the message contains |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\nMore hostile inputs that cannot be committed as files (FIFOs, read-only directories, outputs that are\n"
        "inputs, concurrent runs, interrupts, thresholds) are built by tests/test_hostile.py itself.\n"
    )
    print(f"wrote {len(cases())} cases to {CASES}", file=sys.stderr)


if __name__ == "__main__":
    main()
