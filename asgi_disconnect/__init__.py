"""Make HTTP client disconnects visible and safe in any ASGI application."""

from ._cancel import shield
from ._exceptions import ClientDisconnected
from ._middleware import DisconnectMiddleware
from ._state import SCOPE_KEY, Detection, DisconnectState, Phase, RequestRecord, disconnect_state
from ._stream import guard_stream

__version__ = "0.1.0"

__all__ = [
    "SCOPE_KEY",
    "ClientDisconnected",
    "Detection",
    "DisconnectMiddleware",
    "DisconnectState",
    "Phase",
    "RequestRecord",
    "__version__",
    "disconnect_state",
    "guard_stream",
    "shield",
]
