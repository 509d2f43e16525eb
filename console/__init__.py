"""vigil.console: the operator's web page next to the runtime (`vigil console`, docs/console.md).

Needs the `console` extra (starlette, uvicorn, websockets). The onboard packages never import it; it imports
the onboard API (the operator stream, the alert and request stores, the control link).
"""
