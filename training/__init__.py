"""vigil.training."""
