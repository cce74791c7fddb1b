"""Shower files: checked HDF5 reading, atomic writing, a cache of synthetic samples.

``python -m calotune.data synth|check`` makes and validates files from the command line;
:mod:`calotune.data.hdf5` holds the checks every detector's reader shares, and
:mod:`calotune.data.cache` builds synthetic reference samples once per search.
"""
