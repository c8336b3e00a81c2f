"""Benchmarks: our kernels against dense SDPA and FlexAttention with the same mask, next to the simulator."""
