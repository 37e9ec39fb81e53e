"""Do the compiled ops raise on bad input, or does the process die? Each call runs in its own
process, so a crash is reported, not suffered: ``python -m bench.error_probe``."""
from __future__ import annotations

import subprocess
import sys

CALL = """
import torch, apsfast
from apsfast._backends import {backend} as ops
device = "{device}"
weight = torch.ones(8, 6, 3, 3, device=device)
try:
    ops.construct(weight, torch.ones(6, 2, device=device), None)  # P.shape[0] != weight.shape[0]
except RuntimeError as error:
    print("raised:", str(error).splitlines()[0])
"""


def main() -> int:
    import torch
    cases = [("cpu", "cpu")] + ([("cuda", "cuda")] if torch.cuda.is_available() else [])
    crashed = 0
    for backend, device in cases:
        done = subprocess.run([sys.executable, "-c", CALL.format(backend=backend, device=device)],
                              capture_output=True, text=True)
        result = done.stdout.strip() or done.stderr.strip().splitlines()[-1:]
        status = "ok" if done.returncode == 0 and "raised" in done.stdout else f"exit {done.returncode}"
        crashed += status != "ok"
        print(f"{backend:5s} {status}: {result}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
