"""vigil.policies."""
