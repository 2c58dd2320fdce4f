"""Registers the line protocol with txgateway (found by twisted.plugin, as the built-in transports are)."""

from linegw.transport import LinePlugin

line = LinePlugin()
