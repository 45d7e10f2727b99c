"""Connection timeouts for `edje serve`: a client that connects and sends nothing, or sends its
request head a byte at a time, is cut off after `header_timeout_s`.

uvicorn times out only idle keep-alive connections, after a response; a fresh connection, or
one sending headers slowly, would hold a socket and a slot forever. A slow *body* is timed in
the app (`edje.serving.app`, 408), where the body is read.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


def timed_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """An h11 protocol class for `uvicorn.Config(http=...)` that closes a connection whose
    request head has not fully arrived `header_timeout_s` after it opened (or after the
    previous response)."""

    class TimedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _waiting_after = None  # the request cycle the timer was started after

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._start_head_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not self._waiting_after:  # a new request's head has been parsed
                self._cancel_head_timer()

        def on_response_complete(self) -> None:
            answered = self.cycle
            super().on_response_complete()  # may parse a pipelined request: a new cycle
            if not self.transport.is_closing() and self.cycle is answered:
                self._start_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _start_head_timer(self) -> None:
            self._cancel_head_timer()
            self._waiting_after = self.cycle
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_too_slow)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol
