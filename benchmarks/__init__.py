"""Throughput benchmarks: training, sampling and bits/dim, with a same-architecture PyTorch baseline."""
