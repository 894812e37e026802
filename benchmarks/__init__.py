"""Benchmarks: offline backend comparison, serving sweeps, quality drift (see issue 5)."""
