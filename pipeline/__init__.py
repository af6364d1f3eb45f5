"""The pipeline, in rooms that import only the rooms below them (no Prefect imports; pyproject.toml's
import-linter contracts keep the shape):

- `cli` (and `train_prior`, the old training entry point): `augment`'s commands;
- `integrations`, `training`, `evaluation`: MMD guidance in users' diffusers pipelines, training of the
  shipped prior, the evaluation of a run;
- `jobs`: the job, its workers and executors;
- `checks`: reference preparation, the label judge, the strength pilot, the reach check, pseudo-classes;
- `measures`: feature extractors and distribution metrics;
- `models`: denoisers and their adapters, model loading, the sampler, the one generation step;
- `plan`, `config`, `seeding`: the plan of a job, its settings and per-sample seeds (the bottom).
"""

__version__ = "0.1.0"
