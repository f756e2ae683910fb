"""Vector indexes (FAISS) over specsearch embeddings."""
