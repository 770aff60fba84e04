"""The engine, ``per_sample_sensitivities`` and what it is made of, without a Trainer."""
