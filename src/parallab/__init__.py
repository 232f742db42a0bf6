"""parallab: what 1, 2, 4 ... N devices buy a PyTorch model, measured and verified."""

__version__ = "0.1.0"
