"""How fast the command line answers `--help`, `--version` and a usage error (none of them imports torch),
beside a bare Python start and an `import torch` run the same way, in the same script.

    python benchmarks/cli_bench.py --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

RUNS = {
    "python -c pass (start-up)": [sys.executable, "-c", "pass"],
    "python -c 'import torch' (peer)": [sys.executable, "-c", "import torch"],
    "qmerge --help": [sys.executable, "-m", "qmerge", "--help"],
    "qmerge -V": [sys.executable, "-m", "qmerge", "-V"],
    "qmerge export --help": [sys.executable, "-m", "qmerge", "export", "--help"],
    "qmerge merge ADAPTER (usage error)": [sys.executable, "-m", "qmerge", "merge", "ADAPTER"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    times: dict[str, list[float]] = {name: [] for name in RUNS}
    for _ in range(args.repeats):  # interleaved, so that a busy moment hits every command alike
        for name, cmd in RUNS.items():
            t = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=False)
            times[name].append(time.perf_counter() - t)
    start = statistics.median(times["python -c pass (start-up)"])
    print(f"{'command':<38} {'median s':>9} {'min s':>7} {'x start-up':>11}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<38} {med:>9.3f} {min(ts):>7.3f} {med / start:>11.1f}")


if __name__ == "__main__":
    main()
