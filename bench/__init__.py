"""Benchmarks of RadFMSlicer's speed and memory, run by hand: ``python -m bench.run [--quick]``."""
