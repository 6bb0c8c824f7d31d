"""Loft benchmarks: style transfer, head-to-head, faithfulness, speed, and the run report."""
