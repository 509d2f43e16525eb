"""vigil.monitors."""
