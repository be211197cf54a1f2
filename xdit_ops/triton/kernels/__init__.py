"""@triton.jit kernels only; their launchers are one level up."""
