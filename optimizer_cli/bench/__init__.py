"""Benchmarks of an original and an optimized model: latency, accuracy, fidelity, memory."""
