"""The training loop on Accelerator, GradCache, checkpoints and optimizers."""
