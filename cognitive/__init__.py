"""cognitive: embeddings, semantic search, classification and generation."""
