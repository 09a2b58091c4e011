from __future__ import annotations


class ClientDisconnected(OSError):
    """The client closed the connection before the response was complete.

    Raised by the ``send()`` that ``DisconnectMiddleware`` hands to the app, as the ASGI
    HTTP spec 2.4 asks of servers ("send() on a closed connection raises an OSError
    subclass"), whatever spec version the server itself implements. It is an
    ``OSError``, so code written for 2.4 servers catches it unchanged. When it escapes
    the app, the middleware absorbs it: the server logs no traceback.
    """
