"""A receiving buffer for the sans-IO codecs of stream protocols: bytes in, and whether the peer closed."""

from __future__ import annotations

from protocols.sentinels import CONNECTION_CLOSED, NEED_DATA, Sentinel


class Stream:
    """Buffers what the peer sent; ``short()`` says what an incomplete buffer means."""

    __slots__ = ("_buffer", "_eof", "max_packet")

    def __init__(self, max_packet: int) -> None:
        self._buffer = bytearray()
        self._eof = False
        self.max_packet = max_packet

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed."""
        if data:
            self._buffer += data
        else:
            self._eof = True

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _short(self, error: type[Exception]) -> Sentinel:
        """NEED_DATA; CONNECTION_CLOSED when the peer closed between packets; ``error`` when inside one."""
        if self._eof:
            if self._buffer:
                raise error("the connection closed in the middle of a packet")
            return CONNECTION_CLOSED
        return NEED_DATA
