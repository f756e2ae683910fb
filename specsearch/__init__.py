"""specsearch: vector-search anomaly detection for stellar spectra on aligned SpecCLIP embeddings."""

__version__ = "0.1.0"
