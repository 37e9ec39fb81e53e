"""``python -m bench.data``: the data-loading benchmark (see apsfast.benchmarks.data)."""
import sys

from apsfast.benchmarks.data import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m bench.data"))
