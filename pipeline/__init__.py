"""Sampling loop, denoiser adapters, config, planning and workers (no Prefect imports)."""

__version__ = "0.1.0"
