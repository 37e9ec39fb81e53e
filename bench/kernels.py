"""``python -m bench.kernels``: the kernel microbenchmark tables (see apsfast.benchmarks.kernels)."""
import sys

from apsfast.benchmarks.kernels import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m bench.kernels"))
