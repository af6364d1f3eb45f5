"""Measurement: feature extractors (`features`) and distribution metrics (`metrics`: MMD, PRDC, FID/KID,
k-NN, garbage, memorisation), used alike by the checks before a job, the evaluation after it and the
training of the prior. Imports only the models room."""
