"""``python -m bench.search``: the search-step benchmark (see apsfast.benchmarks.search)."""
import sys

from apsfast.benchmarks.search import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m bench.search"))
