"""calotune: distributed hyperparameter search for calorimeter fast-simulation models."""

__version__ = "0.1.0"
