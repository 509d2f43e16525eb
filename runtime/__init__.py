"""vigil.runtime."""
