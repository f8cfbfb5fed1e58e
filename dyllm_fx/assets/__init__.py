"""Data shipped inside the package: the embedded tiny-llada checkpoint."""
