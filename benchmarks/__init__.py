"""kvtier benchmarks: load generator (``benchmarks.loadgen``) and the side-by-side
comparison (``benchmarks.compare``)."""
