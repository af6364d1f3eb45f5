"""Quality checks before and around generation: reference preparation (`reference`), the label judge
(`fidelity`), the strength pilot (`pilot`), the reach check (`reach`) and pseudo-classes (`pseudo`).
They sample through `pipeline.models.generation` and never import the job (`pipeline.jobs`)."""
