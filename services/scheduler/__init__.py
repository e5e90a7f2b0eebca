"""The elastic scheduler: predicts per-stage work, watches the queues, and sets how many
encoder, dit and decoder instances run (see docs/scaling.md)."""
