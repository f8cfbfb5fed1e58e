"""Triton kernels and their torch reference ops (kernels issue)."""
