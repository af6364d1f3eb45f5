"""The bottom room: models and the sampler. The `Denoiser` protocol and its adapters, model loading and the
shipped prior, the sampling loop and its numerics, the testbed, and the one generation step every room
above shares (`generation`). Imports only `pipeline.config`, `pipeline.seeding` and `pipeline.plan`."""
