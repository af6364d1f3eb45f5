"""Training of the shipped prior, one module per concern (config, augmentation, data, loop machinery,
stages, evaluation, model card, CLI)."""
