"""Speed and memory benchmarks of the training step and of inference (``benchmarks.benchmark``)."""
