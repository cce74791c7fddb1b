"""The physics dashboard: a read-only web view of the searches and models in a tracking store.

``python -m calotune.dashboard [--home DIR | --tracking-uri URI] [--host H] [--port P]``;
the pages are described in :mod:`calotune.dashboard.app`.
"""
