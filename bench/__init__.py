"""Benchmarks: `make bench` runs them; see docs/BENCHMARKS.md."""
