"""Prometheus metrics for aborted requests: ``AbortMetrics``, an ``on_disconnect`` hook.

::

    from asgi_disconnect import DisconnectMiddleware
    from asgi_disconnect.prometheus import AbortMetrics

    app = DisconnectMiddleware(app, on_disconnect=[AbortMetrics()])

It counts each request whose client left before the response was complete and observes
how long it ran, from ``state.record``. Nothing runs for a request that was not aborted.
It needs the ``[prometheus]`` extra (prometheus_client), imported with this module only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from itertools import pairwise

from ._state import DisconnectState
from ._types import Scope

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
except ImportError as exc:
    raise ImportError(
        "asgi_disconnect.prometheus needs prometheus_client: pip install 'asgi-disconnect[prometheus]'"
    ) from exc

__all__ = ["DEFAULT_BUCKETS", "KNOWN_METHODS", "OTHER_METHOD", "UNMATCHED_ROUTE", "AbortMetrics"]

#: The methods that keep their own ``method`` label value, as sent (methods are
#: case-sensitive): RFC 9110's and PATCH (RFC 5789), OpenTelemetry's "known" methods.
KNOWN_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"})
#: The ``method`` label of every other method (OpenTelemetry's ``_OTHER``).
OTHER_METHOD = "other"
#: The ``route`` label of a request that no route template matched (a 404, a raw ASGI app).
UNMATCHED_ROUTE = "unmatched"
#: Upper bounds in seconds: a client that gives up at once (a few ms) up to an LLM stream
#: abandoned after minutes. Prometheus adds ``+Inf``.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)

_LABELS = ("method", "route", "phase", "cancelled")
# The legacy metric name charset, without the colons kept for recording rules: a name
# every Prometheus version and every scraper accepts.
_NAMESPACE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class AbortMetrics:
    """An ``on_disconnect`` hook that counts aborted requests and observes their durations.

    ``DisconnectMiddleware(app, on_disconnect=[AbortMetrics()])`` exports, each prefixed
    by ``namespace_`` when ``namespace`` is given:

    - ``http_requests_aborted_total`` (counter): requests whose client left before the
      response was complete;
    - ``http_request_aborted_duration_seconds`` (histogram): their duration, from the
      request's arrival to the handler's return (``record.duration_ms``), over ``buckets``
      (``DEFAULT_BUCKETS``: 5 ms to 10 minutes).

    Both are labelled by ``method``, ``route``, ``phase`` and ``cancelled``. ``route`` is
    the route template (``/items/{item_id}``), never the raw path, and ``"unmatched"``
    when no template is known. Any method outside ``KNOWN_METHODS`` is labelled
    ``"other"``, as OpenTelemetry does: a client may send any token as a method, and each
    one would otherwise add series to the registry. ``phase`` is where the client left
    (``before_response``, ``mid_body``, ``stalled``); ``cancelled`` is ``"true"`` when the
    middleware cancelled the handler (cancel mode), ``"false"`` when the handler stopped
    by itself, as a Starlette ``StreamingResponse`` does when it hears of the disconnect.

    The metrics are registered in ``registry`` (prometheus_client's default ``REGISTRY``
    when None) and reachable as ``aborted`` and ``duration``. A registry holds one
    ``AbortMetrics`` per namespace: a second one raises ``ValueError`` (share one instance
    between middlewares instead). The hook is synchronous and takes two labelled updates:
    it runs only for aborted requests, after the handler returned.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        namespace: str = "",
        *,
        buckets: Iterable[float] = DEFAULT_BUCKETS,
    ) -> None:
        if registry is None:
            registry = REGISTRY
        elif not isinstance(registry, CollectorRegistry):
            raise TypeError(
                f"registry takes a prometheus_client.CollectorRegistry (None: the default REGISTRY), got {registry!r}"
            )
        if not isinstance(namespace, str):
            raise TypeError(f"namespace takes a string (the metric name prefix, '' for none), got {namespace!r}")
        if namespace and _NAMESPACE.fullmatch(namespace) is None:
            raise ValueError(
                f"namespace must be a metric name prefix: letters, digits and underscores, "
                f"not starting with a digit; got {namespace!r}"
            )
        bounds = _check_buckets(buckets)
        prefix = f"{namespace}_" if namespace else ""
        self._names = (f"{prefix}http_requests_aborted_total", f"{prefix}http_request_aborted_duration_seconds")
        #: The registry both metrics are registered in.
        self.registry: CollectorRegistry = registry
        # Made unregistered, then registered together: a clash on the second must not
        # leave the first behind in the user's registry.
        #: ``http_requests_aborted_total``.
        self.aborted = Counter(
            f"{prefix}http_requests_aborted",
            "HTTP requests whose client left before the response was complete.",
            _LABELS,
            registry=None,
        )
        #: ``http_request_aborted_duration_seconds``.
        self.duration = Histogram(
            f"{prefix}http_request_aborted_duration_seconds",
            "Duration of the HTTP requests whose client left, from arrival to the handler's return.",
            _LABELS,
            registry=None,
            buckets=bounds,
        )
        self._register(namespace)

    def _register(self, namespace: str) -> None:
        registered: list[Counter | Histogram] = []
        try:
            for collector in (self.aborted, self.duration):
                self.registry.register(collector)
                registered.append(collector)
        except ValueError as exc:  # prometheus_client's DuplicateTimeseries
            for collector in registered:
                self.registry.unregister(collector)
            clashes = ", ".join(sorted(getattr(exc, "duplicates", ()))) or str(exc)
            raise ValueError(
                f"the registry already holds {clashes} (another AbortMetrics with namespace={namespace!r}, "
                f"or a metric of your own): make one AbortMetrics per registry and pass it to every "
                f"DisconnectMiddleware (on_disconnect=[metrics]), or give this one another namespace= "
                f"or its own registry=CollectorRegistry()"
            ) from exc

    def __call__(self, scope: Scope, state: DisconnectState) -> None:
        """Count the aborted request ``state.record`` describes and observe its duration.

        A state without a record of a departure (a completed request) counts nothing.
        """
        record = state.record
        if record is None or record.phase is None:
            return
        method = record.method if record.method in KNOWN_METHODS else OTHER_METHOD
        route = UNMATCHED_ROUTE if record.route is None else record.route
        cancelled = "true" if record.cancelled else "false"
        self.aborted.labels(method, route, record.phase, cancelled).inc()
        self.duration.labels(method, route, record.phase, cancelled).observe(record.duration_ms / 1000)

    def __repr__(self) -> str:
        return f"<AbortMetrics {', '.join(self._names)}>"


def _check_buckets(buckets: Iterable[float]) -> tuple[float, ...]:
    """The histogram's upper bounds, checked here to say what is wrong in our terms."""
    if isinstance(buckets, str | bytes) or not isinstance(buckets, Iterable):
        raise TypeError(f"buckets takes an iterable of upper bounds in seconds, got {buckets!r}")
    bounds = tuple(buckets)
    for bound in bounds:
        if isinstance(bound, bool) or not isinstance(bound, int | float):
            raise TypeError(f"buckets takes numbers of seconds, got {bound!r} in {bounds!r}")
        if not bound > 0:  # NaN included
            raise ValueError(f"buckets takes upper bounds > 0 seconds, got {bound!r} in {bounds!r}")
    finite = [bound for bound in bounds if bound != float("inf")]
    if not finite:
        raise ValueError(f"buckets takes at least one finite upper bound, got {bounds!r}")
    if any(low >= high for low, high in pairwise(bounds)):
        raise ValueError(f"buckets must be strictly increasing, got {bounds!r}")
    return tuple(float(bound) for bound in bounds)
