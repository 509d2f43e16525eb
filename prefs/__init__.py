"""vigil.prefs: operator preferences between two recorded attempts, as a training signal (`vigil prefs`,
docs/preferences.md). The queries live in the runtime's store (runtime/preferences.py)."""
