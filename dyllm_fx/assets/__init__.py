"""Data shipped inside the package: the embedded checkpoints tiny-llada (``load("default")``) and
tiny-dream (``load("default-dream")``)."""
