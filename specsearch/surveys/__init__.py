"""Readers that turn raw survey files into canonical shards.

Every reader yields ``(shards, rejects)`` pairs of Arrow tables, one per batch: ``shards``
follows ``specsearch.schema.SHARD_SCHEMA`` and ``rejects`` follows ``REJECTS_SCHEMA`` (a row that
could not be used, with its reason). A file that cannot be read at all raises ``InputError`` with
a one-line message naming the file.
"""
