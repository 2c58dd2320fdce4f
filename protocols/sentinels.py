"""What the codecs here return besides events: more bytes are needed, or the peer has closed."""

from __future__ import annotations


class Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = Sentinel("NEED_DATA")
CONNECTION_CLOSED = Sentinel("CONNECTION_CLOSED")
