"""``SensitivityMonitor`` in a real Trainer, read back from what was logged."""
