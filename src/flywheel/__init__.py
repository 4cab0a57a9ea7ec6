"""Flywheel: continuous training and delivery for PyTorch models on MLflow and TorchServe."""

__version__ = "0.1.0"
