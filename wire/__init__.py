"""vigil.wire: the wire protocol (message types, array specs, codec, transport helpers).

A leaf package: it imports numpy, msgpack and pyzmq, and nothing of vigil, so that policies, monitors, the
runtime, robot drivers and tools can all share it without importing each other.
"""
