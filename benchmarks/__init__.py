"""Benchmarks of DePT against its baselines: text throughput, the prompt KV cache, and visual DePT on a ViT."""
