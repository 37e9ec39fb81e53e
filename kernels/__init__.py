"""Triton kernels of apsfast (installed as ``apsfast.kernels``).

Imported only by the Triton backend, and only where ``triton`` imports.
"""
