"""Process groups and the wiring of tensor/pipeline parallelism (kept out of model code)."""
