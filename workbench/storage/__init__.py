"""What a run writes and reads back: checkpoints, durable files, staged outputs, saved models, caches."""
