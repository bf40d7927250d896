"""CPU-only speed-ups, switched by `pipeline.accel`: shards, memory, attention (with native), jobs."""
