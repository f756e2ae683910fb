"""specsearch: vector-search anomaly detection for stellar spectra on aligned SpecCLIP embeddings.

The Python API (``specsearch.api``), the library twin of the ``specsearch`` command::

    import specsearch as ss
    store = ss.open_store("demo-out/store")
    store.scores("DR2", top=10)            # the strangest stars, after triage
    store.search(source_id=..., k=5).plot("neighbours.png")
    store.show(source_id=...).plot("star.png")
    store.sql("SELECT release, count(*) FROM scores_history GROUP BY 1").df()
"""

__version__ = "0.1.0"

_API = (
    "open_store",
    "create_store",
    "predict",
    "translate",
    "simulate",
    "demo",
    "Result",
    "SearchResult",
    "StarResult",
    "SpecStore",
)
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    # the API loads on first use, so `import specsearch` stays light for the command line
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'specsearch' has no attribute {name!r}")
