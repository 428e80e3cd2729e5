"""The nightly path for catalogs that outgrow memory: streamed fusion, memory-mapped vectors,
users retrieved, featured and ranked in batches (see docs/scale.md)."""
