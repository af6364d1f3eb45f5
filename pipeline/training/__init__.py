"""Training of the shipped prior, one module per concern (config, augmentation, data, loop machinery,
stages, evaluation, model card, CLI; `python -m pipeline.training`), and MCLR fine-tuning of it (`mclr`:
`python -m pipeline.training.mclr`)."""
