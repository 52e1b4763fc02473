"""The wxscale benchmark suite: each hot path measured against its physical limit or a rival; `python -m benchmarks`."""
