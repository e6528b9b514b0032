"""Time of one forward pass of actsafe.py's default conv encoder (depth 32, one 64x64 image) per torch thread count.

    nice -n 10 python benchmarks/actsafe_threads.py --threads 1 2 --repeats 2

Each measurement runs in a fresh process (torch's thread pool is set once per process), 20 warm-up passes, then
the mean over 200 passes. This backs the `--torch-threads 1` default of actsafe.py on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import sys, time, torch, torch.nn as nn
sys.path.insert(0, {repo!r})
from common import ConvEncoder
torch.set_num_threads({threads})
torch.manual_seed(0)
enc, x = ConvEncoder(3, 32, activation=nn.ELU), torch.rand(1, 3, 64, 64) - 0.5
with torch.no_grad():
    for _ in range(20):
        enc(x)
    t = time.perf_counter()
    for _ in range(200):
        enc(x)
print((time.perf_counter() - t) / 200 * 1e3)
"""

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts to compare")
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per thread count")
    cli = p.parse_args()
    print("| torch threads | ms per encoder forward (one image), each process |")
    print("|---|---|")
    for n in cli.threads:
        times = []
        for _ in range(cli.repeats):
            out = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), threads=n)], check=True,
                                 capture_output=True, text=True).stdout
            times.append(float(out.strip().splitlines()[-1]))
        print(f"| {n} | {', '.join(f'{t:.2f}' for t in times)} |", flush=True)
