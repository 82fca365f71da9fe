"""How often the quantization probe (`qmerge check --probe-quant`) names the settings training used.

For each seed, a tiny Llama base (its own random weights) and a memorization task (its own random
answers) are made; one adapter is trained with `qmerge train` under each of NF4/FP4 x double quant on
and off; each adapter, with its training record removed (as when TRL or a bare script trained it), is
probed on its training data with the QLoRA default (NF4, double quant) established. Prints, per true
setting, how often the best-fitting setting is the true one (quant type; quant type and double quant),
how often the verdict warns when it should, and the probe's time per adapter.

    python benchmarks/probe_bench.py --seeds 3 --steps 150
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

TRUE_SETTINGS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def write_data(path: Path, seed: int, n: int, words: int) -> Path:
    """n chat records "code K" -> a random sequence of corpus words (memorized, so the adapter must fit)."""
    from qmerge.demo.tiny import CORPUS

    vocab = sorted(set(CORPUS.replace("\n", " ").split()))
    rng = random.Random(seed)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"code {i}"},
                {"role": "assistant", "content": " ".join(rng.choice(vocab) for _ in range(words))},
            ]
        }
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--words", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--init-std", type=float, default=0.1)
    ap.add_argument(
        "--held-out",
        action="store_true",
        help="probe on other records of the same task, not the training data",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write every result here")
    args = ap.parse_args()

    import torch

    from qmerge.demo.run import _quiet
    from qmerge.demo.tiny import TinySpec, build_base
    from qmerge.pipeline.base import QuantSettings
    from qmerge.pipeline.model import load_tokenizer
    from qmerge.pipeline.source import open_checkpoint
    from qmerge.train.config import load_train_config
    from qmerge.train.trainer import remove_checkpoints, train
    from qmerge.verify.probe import probe_quantization
    from qmerge.verify.runner import chunks
    from qmerge.verify.tokens import data_batch

    _quiet()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="qmerge-probe-"))
    results = []
    try:
        for seed in range(args.seeds):
            spec = TinySpec(
                hidden_size=args.hidden,
                intermediate_size=2 * args.hidden,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                seed=1000 + seed,
                init_std=args.init_std,
            )
            base = build_base(work / f"base{seed}", spec)
            data = write_data(work / f"data{seed}.jsonl", seed, args.records, args.words)
            probe_data = (
                write_data(work / f"held{seed}.jsonl", 10_000 + seed, args.records, args.words)
                if args.held_out
                else data
            )
            for quant_type, dq in TRUE_SETTINGS:
                out = work / f"a{seed}-{quant_type}-{int(dq)}"
                cfg = load_train_config(
                    None,
                    dict(
                        base=base,
                        data=data,
                        output=out,
                        max_steps=args.steps,
                        per_device_train_batch_size=8,
                        gradient_accumulation_steps=1,
                        learning_rate=1e-3,
                        r=16,
                        lora_alpha=32,
                        save_steps=10_000,
                        logging_steps=50,
                        max_seq_length=64,
                        seed=seed,
                        gradient_checkpointing=False,
                        quant_type=quant_type,
                        double_quant=dq,
                    ),
                )
                trained = train(cfg, log=None)
                remove_checkpoints(out)
                (out / "qmerge_training.json").unlink()  # as TRL or a bare script leaves it
                t = time.perf_counter()
                source = open_checkpoint(out, base, QuantSettings())
                tok = load_tokenizer(out, base)
                parts = chunks(data_batch(tok, probe_data, 64, args.records), 320)
                probe = probe_quantization(source, parts)
                seconds = time.perf_counter() - t
                best = probe.best
                row = {
                    "seed": seed,
                    "true": [quant_type, dq],
                    "best": [best["quant_type"], best["double_quant"], best["dtype"]],
                    "verdict": probe.verdict,
                    "last_loss": trained["last_loss"],
                    "losses": {
                        f"{s['quant_type']}/{int(s['double_quant'])}/{s['dtype']}": round(s["loss"], 5)
                        for s in probe.settings
                    },
                    "probe_s": round(seconds, 1),
                }
                results.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summarize(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


def summarize(results: list[dict]) -> None:
    """Per true setting: how often the best-fitting setting has the true quant type, the true quant type and
    double quant, and the true quant type, double quant and load dtype (bf16, as the bases are stored); how
    often the verdict is what it should be; the probe's seconds."""
    print("\ntrue setting        N  best type  best type+dq  best type+dq+dtype  verdict right  probe s")
    for quant_type, dq in TRUE_SETTINGS:
        rows = [r for r in results if r["true"] == [quant_type, dq]]
        if not rows:
            continue
        kind = sum(r["best"][0] == quant_type for r in rows)
        both = sum(r["best"][:2] == [quant_type, dq] for r in rows)
        all3 = sum(r["best"] == [quant_type, dq, "bfloat16"] for r in rows)
        # NF4 + double quant is established: the verdict should be "differs" exactly when training used FP4
        right = sum(r["verdict"] == ("differs" if quant_type == "fp4" else "agrees") for r in rows)
        secs = sum(r["probe_s"] for r in rows) / len(rows)
        label = f"{quant_type}, {'dq' if dq else 'no dq'}"
        print(f"{label:<18} {len(rows):>2}  {kind:>9}  {both:>12}  {all3:>18}  {right:>13}  {secs:>7.1f}")


if __name__ == "__main__":
    main()
