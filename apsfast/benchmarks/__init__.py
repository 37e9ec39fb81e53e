"""Benchmarks shipped with the package (``apsfast bench …``)."""
