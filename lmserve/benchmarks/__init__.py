"""Benchmark scripts: each has add_arguments() and a seeded main() that prints one JSON line per run."""
