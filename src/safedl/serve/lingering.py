"""The transport the guarded HTTP protocol hands to uvicorn (serve/protocol.py): ``close()`` becomes the protocol's
lingering close (half-close, then discard what the client still sends, briefly), so a client whose request was
answered early reads the answer instead of a reset."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class LingeringTransport(asyncio.Transport):
    """The transport uvicorn is given: ``close()`` hands over to the protocol's lingering close, and writes after
    it are dropped; everything else goes to the real transport."""

    def __init__(self, transport: asyncio.Transport, *, on_close: Callable[[], None]):
        super().__init__()
        self.inner = transport
        self.on_close = on_close
        self.closing = False

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.on_close()

    def is_closing(self) -> bool:
        return self.closing or self.inner.is_closing()

    def write(self, data: Any) -> None:
        if not self.closing:
            self.inner.write(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def pause_reading(self) -> None:
        if not self.closing:  # a lingering connection keeps reading (and discarding)
            self.inner.pause_reading()

    def resume_reading(self) -> None:
        self.inner.resume_reading()

    def abort(self) -> None:
        self.closing = True
        self.inner.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.inner.get_extra_info(name, default)

    def is_reading(self) -> bool:
        return self.inner.is_reading()

    def write_eof(self) -> None:
        self.inner.write_eof()

    def can_write_eof(self) -> bool:
        return self.inner.can_write_eof()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.inner.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self.inner.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.inner.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.inner.set_write_buffer_limits(high, low)
