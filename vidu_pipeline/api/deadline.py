"""A total deadline for each HTTP call, enforced by a watchdog that shuts its socket down.

A socket read timeout bounds the wait for the *next* byte, so a server that sends one byte
every few seconds — in the status line, the headers or the body — keeps a call alive forever.
Checking the clock between body chunks does not help either: the header phase is read line by
line inside ``http.client``, out of our hands. So instead, one watchdog thread per process holds
the deadlines of the calls in flight; when one passes, it shuts down (``shutdown(SHUT_RDWR)``)
the sockets that call is using. Whatever the call was blocked in — connect, sending the body,
waiting for headers, reading the body — returns at once with an error or an early EOF, which
the caller reports as a deadline: ``Call.expired`` says so.

How a call's sockets are found: requests runs the call in the caller's thread, so the call is
kept in a context variable and urllib3's connection classes (swapped in by
:class:`DeadlineAdapter`) attach themselves to it when they connect or send a request.
:class:`DeadlineRetry` does not start a retry (or sleep for one) past the deadline, and treats an
unreadable ``Retry-After`` as absent rather than failing the call.
"""

from __future__ import annotations

import contextlib
import contextvars
import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, InvalidHeader, MaxRetryError, ResponseError
from urllib3.util.retry import Retry

_current: contextvars.ContextVar[Call | None] = contextvars.ContextVar("vidu_http_call", default=None)


class Call:
    """One call's deadline and the connections it has used."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expires_at = time.monotonic() + seconds
        self.expired = False
        self.done = False
        self._lock = threading.Lock()
        self._connections: list[_HTTPConnection] = []

    def remaining(self) -> float:
        return self.expires_at - time.monotonic()

    def attach(self, conn: _HTTPConnection) -> None:
        """This connection now works for this call (a pooled one may have served another)."""
        with self._lock:
            conn.vidu_call = self
            if conn not in self._connections:
                self._connections.append(conn)
            if self.expired:
                _shut(conn)

    def expire(self) -> None:
        """Mark the deadline passed and cut every socket this call still owns."""
        with self._lock:
            if self.done:
                return
            self.expired = True
            for conn in self._connections:
                if conn.vidu_call is self:
                    _shut(conn)

    def finish(self) -> None:
        with self._lock:
            self.done = True
            for conn in self._connections:
                if conn.vidu_call is self:
                    conn.vidu_call = None
            self._connections.clear()


def _shut(conn: _HTTPConnection) -> None:
    # conn.sock is dropped once a "Connection: close" answer's headers are read, while the
    # body is still read from that socket: hence the connection's own reference to it.
    sock = conn.sock or conn.vidu_sock
    if sock is None:
        return  # still connecting: connect() checks the deadline when it is done
    # The plain socket's shutdown, also under TLS: SSLSocket.shutdown would drop the TLS
    # object under a reader in another thread.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class Watchdog:
    """One daemon thread that expires calls at their deadlines (started on first use, and
    again in a forked child, which inherits no threads)."""

    def __init__(self) -> None:
        self._order = itertools.count()
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Call]] = []
        self._started = False

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[Call]:
        """Run the calls made inside under one total deadline of ``seconds``."""
        call = Call(seconds)
        token = _current.set(call)
        with self._cond:
            self._start()
            while self._heap and self._heap[0][2].done:  # finished calls leave from the top
                heapq.heappop(self._heap)
            heapq.heappush(self._heap, (call.expires_at, next(self._order), call))
            if self._heap[0][2] is call:  # only a new earliest deadline needs the thread awake
                self._cond.notify()
        try:
            yield call
        finally:
            call.finish()
            _current.reset(token)

    def _start(self) -> None:
        if not self._started:
            self._started = True
            threading.Thread(target=self._run, name="vidu-http-deadlines", daemon=True).start()

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].done or self._heap[0][0] <= now):
                    heapq.heappop(self._heap)[2].expire()
                self._cond.wait(self._heap[0][0] - now if self._heap else None)


WATCHDOG = Watchdog()
deadline = WATCHDOG.deadline


def current() -> Call | None:
    return _current.get()


# --- urllib3 and requests, made to report to the current call --------------------------------


class _HTTPConnection(HTTPConnection):
    """urllib3's connection, joining the current call before any byte is sent."""

    vidu_sock: socket.socket | None = None
    vidu_call: Call | None = None

    def connect(self) -> None:
        super().connect()
        self.vidu_sock = self.sock
        call = current()
        if call is not None and call.expired:
            self.close()
            raise ConnectTimeoutError(self, f"total deadline of {call.seconds:.0f} s passed while connecting")

    def request(self, *args, **kwargs) -> None:
        call = current()
        if call is not None:
            if call.expired:  # nothing of this request has been sent
                raise ConnectTimeoutError(self, f"total deadline of {call.seconds:.0f} s passed before sending")
            call.attach(self)
        if self.sock is not None:
            self.vidu_sock = self.sock
        super().request(*args, **kwargs)


class _HTTPSConnection(_HTTPConnection, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class DeadlineAdapter(HTTPAdapter):
    """requests' adapter with connections that the watchdog can cut (HTTP proxies included;
    SOCKS proxies keep their own connection classes and only the read timeout)."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_POOLS)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs):
        fresh = proxy not in self.proxy_manager
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if fresh and not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = dict(_POOLS)
        return manager


class DeadlineRetry(Retry):
    """A Retry that starts no attempt it would have to begin after the current deadline."""

    def get_retry_after(self, response) -> float | None:
        try:
            return super().get_retry_after(response)
        except InvalidHeader:  # e.g. "Retry-After: soon": wait the usual backoff instead
            return None

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        new = super().increment(method, url, response, error, _pool, _stacktrace)
        call = current()
        if call is not None:
            wait = (
                self.respect_retry_after_header and response is not None and new.get_retry_after(response)
            ) or new.get_backoff_time()
            if call.expired or call.remaining() <= wait:
                reason = error or ResponseError(f"no time left for a retry within {call.seconds:.0f} s")
                raise MaxRetryError(_pool, url, reason) from reason
        return new
