"""Benchmarks run as scripts (``python benchmarks/NAME.py``); a package so they can share `benchmarks.procs`."""
