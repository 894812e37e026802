"""PyTorch definitions of the three submodels."""
