"""Benchmarks of AB-training against DDP, PowerSGD and post-local SGD (see BENCHMARKS.md)."""
