"""Training: LightningModules, DataModule, losses and teachers."""
