"""engram_store: owns Engram arenas, publishes their descriptors, serves batched row lookups."""
