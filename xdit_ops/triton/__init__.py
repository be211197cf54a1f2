"""Triton launchers (triton_op + wrap_triton); ``kernels/`` holds the @triton.jit code."""
