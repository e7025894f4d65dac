"""Prometheus metrics of one :class:`~devicelist_plugin.module.DeviceListModule`.

Each :class:`DeviceListMetrics` has its own ``CollectorRegistry`` (several
modules in one process do not collide); every name starts with
``devicelist_``:

- ``devicelist_edus_received_total{edu_type, outcome}``: EDUs taken from
  ``/send`` (``accepted``, ``malformed``, ``unknown_type``, ...);
- ``devicelist_transactions_received_total{outcome}``: inbound transactions;
- ``devicelist_edus_decided_total{action, reason}``: device-list updates
  decided on (apply, skip, hold, resync);
- ``devicelist_edus_ignored_total{reason}``: updates not queued
  (``not_tracked``, ``local_user``, ``wrong_origin``);
- ``devicelist_resyncs_total{reason}``: resyncs triggered;
- ``devicelist_resync_results_total{result}``: resync attempts and outcomes;
- ``devicelist_transactions_sent_total``, ``devicelist_transactions_failed_total``,
  ``devicelist_edus_sent_total``: the outbound sender;
- ``devicelist_pending_updates{destination}``: pending outbound updates
  (read from the store at each scrape);
- ``devicelist_request_duration_seconds{method, prefix, code}``: HTTP
  request latencies (a histogram fed by the Site's request observer).

The counters are read from the components' own statistics at scrape time
(a custom collector), so nothing on the hot paths knows about Prometheus.
:attr:`DeviceListMetrics.resource` serves the text exposition format.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

if TYPE_CHECKING:
    from devicelist_plugin.module import DeviceListModule

__all__ = ["DeviceListMetrics", "MetricsResource"]

_IGNORED = {
    "edu_not_tracked": "not_tracked",
    "edu_local_user": "local_user",
    "edu_wrong_origin": "wrong_origin",
}


class _ModuleCollector(Collector):
    def __init__(self, module: "DeviceListModule", metrics: "DeviceListMetrics") -> None:
        self._module = module
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        module = self._module
        received = CounterMetricFamily(
            "devicelist_edus_received", "EDUs received in transactions",
            labels=["edu_type", "outcome"],
        )
        txns = CounterMetricFamily(
            "devicelist_transactions_received", "Inbound transactions (and their PDUs)",
            labels=["outcome"],
        )
        for (edu_type, outcome), n in sorted(module.inbound.receiver.stats.items()):
            if edu_type == "transaction":
                txns.add_metric([str(outcome)], n)
            elif edu_type == "pdu":
                txns.add_metric([f"pdu_{outcome}"], n)
            else:
                received.add_metric([edu_type, str(outcome)], n)
        yield received
        yield txns

        decided = CounterMetricFamily(
            "devicelist_edus_decided", "Device-list updates decided on",
            labels=["action", "reason"],
        )
        resyncs = CounterMetricFamily(
            "devicelist_resyncs", "Resyncs triggered, by reason", labels=["reason"]
        )
        ignored = CounterMetricFamily(
            "devicelist_edus_ignored", "Device-list updates not queued, by reason",
            labels=["reason"],
        )
        results = CounterMetricFamily(
            "devicelist_resync_results", "Resync attempts, by result", labels=["result"]
        )
        stats = module.inbound.updater.stats
        for key, n in sorted(stats.items()):
            if ":" in key:
                action, reason = key.split(":", 1)
                decided.add_metric([action, reason], n)
                if action == "resync":
                    resyncs.add_metric([reason], n)
            elif key in _IGNORED:
                ignored.add_metric([_IGNORED[key]], n)
            elif key.startswith("resync_"):
                results.add_metric([key[len("resync_"):]], n)
        yield decided
        yield resyncs
        yield ignored
        yield results

        sender = module.sender
        for name, doc, value in (
            ("devicelist_transactions_sent", "Outbound transactions delivered",
             sender.transactions_sent),
            ("devicelist_transactions_failed", "Outbound transaction attempts that failed",
             sender.failures),
            ("devicelist_edus_sent", "EDUs delivered", sender.edus_sent),
        ):
            yield CounterMetricFamily(name, doc, value=value)

        pending = GaugeMetricFamily(
            "devicelist_pending_updates", "Pending outbound updates per destination",
            labels=["destination"],
        )
        for destination, count in sorted(self._metrics.pending.items()):
            pending.add_metric([destination], count)
        yield pending


class DeviceListMetrics:
    """The metrics of one module (see the module docstring)."""

    log = Logger()

    def __init__(self, module: "DeviceListModule") -> None:
        self._module = module
        self.registry = CollectorRegistry(auto_describe=True)
        #: destination -> pending updates, refreshed by :meth:`refresh`
        self.pending: dict[str, int] = {}
        self.request_duration = Histogram(
            "devicelist_request_duration_seconds",
            "HTTP request latencies",
            ["method", "prefix", "code"],
            registry=self.registry,
        )
        self.registry.register(_ModuleCollector(module, self))
        self.resource = MetricsResource(self)

    def observe_request(self, request: IRequest, seconds: float) -> None:
        """Record one finished HTTP request (a Site's request observer)."""
        path = getattr(request, "path", b"") or b""
        segments = path.split(b"/")[1:3]
        prefix = "/" + "/".join(s.decode("ascii", "replace") for s in segments)
        method = (getattr(request, "method", b"") or b"").decode("ascii", "replace")
        code = str(getattr(request, "code", 0))
        self.request_duration.labels(method, prefix, code).observe(seconds)

    async def refresh(self) -> None:
        """Read the pending counts from the store."""
        statuses = await self._module.store.get_destination_statuses()
        self.pending = {s.destination: s.pending for s in statuses}

    async def exposition(self) -> bytes:
        """The text exposition, after a refresh of what is read from the store."""
        try:
            await self.refresh()
        except Exception:
            self.log.failure("devicelist: reading the pending counts failed")
        return bytes(generate_latest(self.registry))


class MetricsResource(Resource):
    """``GET``: the Prometheus text exposition of one module's metrics."""

    isLeaf = True

    def __init__(self, metrics: DeviceListMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: IRequest) -> object:
        def write(body: bytes) -> None:
            request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
            request.write(body)
            request.finish()

        def failed(failure: object) -> None:
            request.setResponseCode(500)
            request.finish()

        Deferred.fromCoroutine(self._metrics.exposition()).addCallbacks(write, failed)
        return NOT_DONE_YET
