"""Core layer, by concept: `corpus` (readers), `encoders` (models and their input pipeline),
`indexing` (the build), `update` (new encoders without re-indexing), `rerank`, `evaluation`;
at the top, the engine that serves searches over one index, and what every part shares
(items, images, devices, numerics, filters, progress)."""
