"""Integrations with users' own code: MMD guidance for their diffusers pipelines (`diffusers_callback`)."""
