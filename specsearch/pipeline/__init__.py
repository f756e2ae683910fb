"""The stages that write the store, in the order data flows through them: ``ingest`` (survey
files -> canonical shards), ``embed`` (shards -> embeddings, reconstructions, predictions,
labels), then the indexes (``specsearch.indexes``), ``score``, ``report`` and ``nightly``; and
``demo``, which runs them on the bundled sample. Each stage returns a small result object whose
``str()`` is its one-line summary."""
