"""Building an index: the resumable build pipeline, its Ray variant, imports of precomputed
vectors, and the re-encode check that `umr index verify --reencode` runs."""
