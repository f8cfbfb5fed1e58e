"""Denoising runtime: the loop, samplers and schedules."""
