"""Side-by-side benchmarks of replicator against rsync (issue 4).

Run ``python -m benchmarks.run --help``; see benchmarks/README.md.
"""
