"""Model families; see :mod:`calotune.models.registry`."""
