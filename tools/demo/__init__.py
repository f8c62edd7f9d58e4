"""Demo model tooling: the synthetic shapes world (world.py), its training (train.py), export and evaluation."""
