"""vigil.sim."""
