"""What reads the store for a user: ``search`` (nearest neighbours), ``sql`` (DuckDB views),
``predict`` (labels and cross-spectrum prediction) and ``output`` (tables, CSV, JSON, Parquet)."""
