"""Microbenchmarks of apsfast (``python -m pytest bench --benchmark-enable``)."""
