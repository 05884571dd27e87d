"""Benchmark helpers shared by the benchmark scripts and ``natkit bench``."""
