"""`augment eval`: the run evaluation and its HTML report, over the measurement room `pipeline.measures`.

- `pipeline.measures.metrics`: pure functions on features [n, F] (MMD² + permutation test, KID, Fréchet
  distance, precision/recall/density/coverage, memorisation, class accuracy, filter-score summaries);
- `pipeline.measures.features`: image -> feature maps (shipped classifier, VAE latents, pixels, user
  `pkg.mod:fn`);
- `report`: matplotlib figures and the self-contained report.html;
- `run_eval.evaluate_run`: a run folder -> eval.json + report.html; `run_eval.compare_sets` for studies.

Import each name from the module that defines it; this package imports nothing, so registering the
`eval` command (`pipeline.evaluation.cli`) does not pull in torch, pyarrow or matplotlib.
"""
