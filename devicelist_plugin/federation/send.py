"""Inbound federation transactions: ``PUT /_matrix/federation/v1/send/{txnId}``.

:class:`TransactionReceiver` answers the endpoint (signed requests only) and
dispatches each EDU to the handler registered for its ``edu_type``
(:meth:`TransactionReceiver.register_edu_handler`; the plugin registers the
device-list and cross-signing EDUs, a host may add its own).

A transaction is checked before anything in it is processed:

- the body's ``origin`` must be the authenticated origin (400
  ``M_MISSING_PARAM`` / ``M_BAD_JSON`` when absent or not a string, 403
  ``M_FORBIDDEN`` when different);
- ``pdus`` (missing: none) and ``edus`` (missing or null: none) must be lists
  of at most 50 and 100 entries: 400 ``M_BAD_JSON`` otherwise;
- a body over the size limit was already answered 413 ``M_TOO_LARGE`` by the
  resource.

A transaction already processed from the same origin with the same
``txnId`` is answered with the response stored then, without processing it
again; one arriving while its twin is still being processed waits for it.
Responses are kept ``retention`` (default 24 h, as Synapse) and pruned every
``prune_interval`` (30 min) while the receiver runs.

EDUs.  Each EDU is handed to its handler in order; the handler returns None
(taken) or a short reason it was ignored (``wrong_origin``, ``not_tracked``,
...).  Every outcome is counted in :attr:`TransactionReceiver.stats` by
``(edu_type, outcome)``; an EDU type with no handler is ignored and counted
as ``("<unknown>", "unknown_type")`` (remote-chosen names are not used as
counter keys).  A malformed EDU (not an object, no ``edu_type`` string, or
content a handler rejects with a :class:`~devicelist_plugin.core.parse.ParseError`)
is logged with the path of the offending field, counted and skipped: the
other EDUs of the transaction are processed and it is answered 200.  Any
other exception of a handler (the store is down) fails the whole transaction
with 500 and stores no response, so the sender retries it: a 200 means every
EDU in it was durably taken.

PDUs.  This is not a room server: each PDU is answered
``{"error": "..."}`` under its ``event_id`` (PDUs without one are counted and
left out) and nothing else is done with it.
"""

from __future__ import annotations

import inspect
from collections import Counter
from typing import Awaitable, Callable, Optional, Protocol, Sequence, Union

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.core.parse import ParseError
from devicelist_plugin.federation.auth import check_origin_matches
from devicelist_plugin.federation.errors import M_BAD_JSON, MatrixError
from devicelist_plugin.federation.resource import JsonRequest, JsonResource

__all__ = [
    "DEFAULT_PRUNE_INTERVAL",
    "DEFAULT_TXN_RETENTION",
    "BatchEduHandler",
    "EduHandler",
    "EduOutcome",
    "MAX_EDUS",
    "MAX_PDUS",
    "PDU_NOT_HANDLED",
    "SEND_PATH",
    "TransactionReceiver",
    "UNKNOWN_EDU_TYPE",
]

SEND_PATH = "/_matrix/federation/v1/send/{txnId}"
MAX_PDUS = 50
MAX_EDUS = 100
DEFAULT_TXN_RETENTION = 24 * 3600.0
DEFAULT_PRUNE_INTERVAL = 30 * 60.0
PDU_NOT_HANDLED = "This server does not handle room events"
UNKNOWN_EDU_TYPE = "<unknown>"

#: ``handler(origin, content)``: None once the EDU is durably taken, or the
#: reason it was ignored.  Raise ``ParseError`` for malformed content; any
#: other exception fails the transaction (500) so that the sender retries.
EduHandler = Callable[[str, object], "Awaitable[Optional[str]] | Optional[str]"]

#: What became of one EDU handed to a batch handler: None (taken), the reason
#: it was ignored, or the ``ParseError`` that rejected it.
EduOutcome = Union[None, str, ParseError]

#: ``handler(origin, contents)``: the contents of all the transaction's EDUs
#: of one type at once, answered with an outcome each, in order; an
#: exception fails the transaction as for :data:`EduHandler`.
BatchEduHandler = Callable[[str, Sequence[object]], Awaitable[Sequence[EduOutcome]]]


# (index in the transaction, edu_type, outcome)
_Outcome = tuple[int, str, EduOutcome]


class ReceivedTransactionStore(Protocol):
    def get_received_txn(self, origin: str, txn_id: str) -> "Deferred[Optional[JsonDict]]": ...

    def store_received_txn(
        self, origin: str, txn_id: str, response: JsonDict, now_ms: int
    ) -> "Deferred[bool]": ...

    def prune_received_txns(self, older_than_ms: int) -> "Deferred[int]": ...


class TransactionReceiver:
    """The ``/send`` endpoint and the EDU registry (see the module docstring).

    :param store: where processed transactions' responses are kept.
    :param clock: timestamps and the pruning timer.
    :param retention: seconds a processed transaction is remembered.
    :param prune_interval: seconds between two prunings.
    """

    log = Logger()

    def __init__(
        self,
        store: ReceivedTransactionStore,
        clock: IReactorTime,
        *,
        retention: float = DEFAULT_TXN_RETENTION,
        prune_interval: float = DEFAULT_PRUNE_INTERVAL,
    ) -> None:
        if retention <= 0 or prune_interval <= 0:
            raise ValueError("retention and prune_interval must be positive")
        self._store = store
        self._clock = clock
        self.retention = retention
        self.prune_interval = prune_interval
        self._handlers: dict[str, EduHandler] = {}
        self._batch_handlers: dict[str, BatchEduHandler] = {}
        self._in_flight: dict[tuple[str, str], list[Deferred[JsonDict]]] = {}
        self._pruner: Optional[LoopingCall] = None
        #: ``(edu_type, outcome)`` -> count; also ``("transaction", ...)``
        #: and ``("pdu", ...)`` entries
        self.stats: Counter[tuple[str, str]] = Counter()

    # -- registry ------------------------------------------------------------

    def register_edu_handler(self, edu_type: str, handler: EduHandler) -> None:
        """Dispatch EDUs of ``edu_type`` to ``handler`` one by one (replacing
        any earlier handler of the type)."""
        self._batch_handlers.pop(edu_type, None)
        self._handlers[edu_type] = handler

    def register_edu_batch_handler(self, edu_type: str, handler: BatchEduHandler) -> None:
        """Dispatch all the EDUs of ``edu_type`` of a transaction to ``handler``
        in one call (replacing any earlier handler of the type)."""
        self._handlers.pop(edu_type, None)
        self._batch_handlers[edu_type] = handler

    def edu_types(self) -> list[str]:
        """The EDU types handled, sorted."""
        return sorted({*self._handlers, *self._batch_handlers})

    # -- lifecycle -------------------------------------------------------------

    def register(self, resource: JsonResource) -> None:
        """Serve ``PUT /send/{txnId}`` on ``resource`` (which needs an authenticator)."""
        resource.register("PUT", SEND_PATH, self.on_send, requires_auth=True, json_body=True)

    def start(self) -> None:
        """Start pruning old transaction responses (now, then every ``prune_interval``)."""
        if self._pruner is not None:
            return
        self._pruner = LoopingCall(self._prune)
        self._pruner.clock = self._clock
        self._pruner.start(self.prune_interval, now=True).addErrback(
            lambda f: self.log.failure("Transaction pruning stopped", f)
        )

    def stop(self) -> None:
        """Stop pruning."""
        if self._pruner is not None and self._pruner.running:
            self._pruner.stop()
        self._pruner = None

    def _prune(self) -> "Deferred[None]":
        cutoff = int((self._clock.seconds() - self.retention) * 1000)
        d = self._store.prune_received_txns(cutoff)

        def done(count: int) -> None:
            if count:
                self.log.info("Forgot {count} received transaction(s)", count=count)

        def failed(failure: Failure) -> None:
            self.log.failure("Pruning received transactions failed", failure)

        return d.addCallbacks(done, failed)

    # -- the endpoint ------------------------------------------------------------

    async def on_send(self, request: JsonRequest) -> tuple[int, JsonDict]:
        origin = request.require_origin()
        body = request.require_content()
        txn_id = request.path_params["txnId"]
        check_origin_matches(origin, body.get("origin"))
        pdus = _bounded_list(body, "pdus", MAX_PDUS)
        edus = _bounded_list(body, "edus", MAX_EDUS)

        key = (origin, txn_id)
        twins = self._in_flight.get(key)
        if twins is not None:
            self.stats[("transaction", "concurrent_duplicate")] += 1
            # wait for the first copy; its failure fails this one too
            twin: Deferred[JsonDict] = Deferred()
            twins.append(twin)
            return 200, await twin
        # registered before the first await, so a copy arriving while the
        # stored-answer lookup runs waits for this one instead of racing it
        waiting: list[Deferred[JsonDict]] = []
        self._in_flight[key] = waiting
        try:
            stored = await self._store.get_received_txn(origin, txn_id)
            if stored is not None:
                self.stats[("transaction", "duplicate")] += 1
                self.log.debug(
                    "Transaction {txn_id} from {origin} already processed",
                    txn_id=txn_id,
                    origin=origin,
                )
                response = stored
            else:
                response = await self._process(origin, txn_id, pdus, edus)
        except Exception:
            failure = Failure()
            for twin in waiting:
                twin.errback(failure)
            raise
        finally:
            del self._in_flight[key]
        for twin in waiting:
            twin.callback(response)
        return 200, response

    async def _process(
        self, origin: str, txn_id: str, pdus: list[object], edus: list[object]
    ) -> JsonDict:
        self.stats[("transaction", "received")] += 1
        await self._receive_edus(origin, edus, txn_id)
        response: JsonDict = {"pdus": self._refuse_pdus(origin, pdus)}
        await self._store.store_received_txn(
            origin, txn_id, response, int(self._clock.seconds() * 1000)
        )
        return response

    def _refuse_pdus(self, origin: str, pdus: Sequence[object]) -> JsonDict:
        answers: JsonDict = {}
        for pdu in pdus:
            event_id = pdu.get("event_id") if isinstance(pdu, dict) else None
            if isinstance(event_id, str):
                answers[event_id] = {"error": PDU_NOT_HANDLED}
                self.stats[("pdu", "not_handled")] += 1
            else:
                self.stats[("pdu", "no_event_id")] += 1
        if pdus:
            self.log.debug(
                "Ignored {count} PDU(s) from {origin}: not a room server",
                count=len(pdus),
                origin=origin,
            )
        return answers

    # -- EDUs --------------------------------------------------------------------

    def receive_edus(self, origin: str, edus: Sequence[object]) -> "Deferred[None]":
        """Process EDUs that arrived in a transaction from the authenticated
        ``origin``, for a host with its own ``/send``.

        Fires once every EDU is durably taken or ignored (malformed and
        ignored EDUs are logged and counted, not errors).  Fails when a
        handler failed: the host must then fail its transaction (500) so
        that the sender retries.
        """
        return Deferred.fromCoroutine(self._receive_edus(origin, edus, None))

    async def _receive_edus(
        self, origin: str, edus: Sequence[object], txn_id: Optional[str]
    ) -> None:
        # All at once: each handler's database work then queues up behind
        # the others' and the store commits them together (one fsync for
        # the transaction's EDUs, not one each); a batch handler gets all
        # the EDUs of its type in one call.  Every EDU is settled before the
        # first failure, if any, fails the transaction.
        taking: list[Deferred[list[_Outcome]]] = []
        batches: dict[str, list[tuple[int, object]]] = {}
        outcomes: list[_Outcome] = []
        for index, edu in enumerate(edus):
            edu_type = self._handled_type(origin, edu)
            if isinstance(edu_type, ParseError):
                outcomes.append((index, UNKNOWN_EDU_TYPE, edu_type))
                continue
            if edu_type is None:
                continue
            assert isinstance(edu, dict)
            if edu_type in self._batch_handlers:
                batches.setdefault(edu_type, []).append((index, edu.get("content")))
            else:
                taking.append(
                    Deferred.fromCoroutine(
                        self._receive_edu(origin, index, edu_type, edu.get("content"))
                    )
                )
        for edu_type, items in batches.items():
            taking.append(Deferred.fromCoroutine(self._receive_batch(origin, edu_type, items)))
        failures = []
        for d in taking:
            try:
                outcomes.extend(await d)
            except Exception:
                failures.append(Failure())
        for index, edu_type, outcome in sorted(outcomes, key=lambda o: o[0]):
            self._record(origin, txn_id, edu_type, index, outcome)
        if failures:
            failures[0].raiseException()

    def _handled_type(self, origin: str, edu: object) -> "str | ParseError | None":
        """The EDU's type if a handler takes it, the problem with a malformed
        one, or None (an unknown type: counted and logged)."""
        if not isinstance(edu, dict):
            return ParseError("", "expected an object")
        edu_type = edu.get("edu_type")
        if not isinstance(edu_type, str):
            return ParseError("edu_type", "expected a string")
        if edu_type not in self._handlers and edu_type not in self._batch_handlers:
            self.stats[(UNKNOWN_EDU_TYPE, "unknown_type")] += 1
            self.log.debug(
                "Ignoring EDU of unknown type {edu_type!r} from {origin}",
                edu_type=edu_type[:100],
                origin=origin,
            )
            return None
        return edu_type

    async def _receive_edu(
        self, origin: str, index: int, edu_type: str, content: object
    ) -> list[_Outcome]:
        outcome: EduOutcome
        try:
            result = self._handlers[edu_type](origin, content)
            if inspect.isawaitable(result):
                outcome = await result
            else:
                outcome = result
        except ParseError as e:
            outcome = e
        except Exception:
            self._failed(origin, edu_type, [index])
            raise
        return [(index, edu_type, outcome)]

    async def _receive_batch(
        self, origin: str, edu_type: str, items: list[tuple[int, object]]
    ) -> list[_Outcome]:
        try:
            outcomes = await self._batch_handlers[edu_type](origin, [c for _, c in items])
        except Exception:
            self._failed(origin, edu_type, [index for index, _ in items])
            raise
        return [(index, edu_type, outcome) for (index, _), outcome in zip(items, outcomes)]

    def _record(
        self, origin: str, txn_id: Optional[str], edu_type: str, index: int, outcome: EduOutcome
    ) -> None:
        if isinstance(outcome, ParseError):
            path = f"edus[{index}]" + (f".{outcome.path}" if outcome.path else "")
            self._malformed(origin, txn_id, edu_type, path, outcome.message)
        else:
            self.stats[(edu_type, outcome if outcome is not None else "accepted")] += 1

    def _failed(self, origin: str, edu_type: str, indexes: list[int]) -> None:
        self.stats[(edu_type, "failed")] += len(indexes)
        self.log.failure(
            "Could not take {edu_type} EDU(s) #{indexes} from {origin}; failing the transaction",
            edu_type=edu_type,
            indexes=",".join(map(str, indexes)),
            origin=origin,
        )

    def _malformed(
        self, origin: str, txn_id: Optional[str], edu_type: str, path: str, message: str
    ) -> None:
        self.stats[(edu_type, "malformed")] += 1
        self.log.warn(
            "Ignoring malformed EDU from {origin} (transaction {txn_id}): {path}: {problem}",
            origin=origin,
            txn_id=txn_id if txn_id is not None else "-",
            path=path,
            problem=message,
        )


def _bounded_list(body: JsonDict, name: str, limit: int) -> list[object]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise MatrixError(400, M_BAD_JSON, f"'{name}' must be a list")
    if len(value) > limit:
        raise MatrixError(
            400, M_BAD_JSON, f"Transaction has {len(value)} {name}, more than {limit}"
        )
    return value

