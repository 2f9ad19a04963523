"""Benchmarks: bench/run.py prints the table; each bench_<family>.py is also a pytest-benchmark module."""
