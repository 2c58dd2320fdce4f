"""
The MQTT client every part of the gateway that talks to a broker is built on:
the broker sources (``transports/mqtt_source.py``), the MQTT sink
(``outbound/mqtt_sender.py``) and the simulator's devices
(``cli/sim_mqtt.py``). Each adds what it does with the connection; this
does what they all must do the same way:

- CONNECT as soon as the connection is made, and leave it if no CONNACK
  comes within ``connack_timeout`` seconds (a subclass may hold the deadline
  longer, until its SUBACK say, and meets it with ``deadline_met``);
- a refused CONNACK, a DISCONNECT from the broker or a broken protocol ends
  the connection, with the reason in words;
- keepalive: a PINGREQ every half keepalive (the broker's Server Keep Alive
  when it gives one), and a broker that has said nothing for one and a half
  keepalives is left, so that a silent broker (a half-open TCP connection)
  is noticed within seconds, not at the kernel's TCP timeout;
- the close waits for TLS's close_notify at most ``close_timeout`` seconds,
  then cuts the connection.

The codec is ``protocols/mqtt.py``; reading is paused and resumed by the
subclass (``may_read``), and the keepalive does not count a pause as silence.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from gateway.reactor import Clock
from gateway.net.tcp import no_delay
from protocols import mqtt

P = mqtt.Property


class MQTTClientProtocol(protocol.Protocol):
    transport: Any
    connack_timeout = 30.0  # seconds from the connection to the CONNACK
    close_timeout = 5.0  # seconds a close waits for the broker's side of it
    too_slow = "no CONNACK within {seconds:g} seconds"  # why the connection is left when the deadline passes

    def __init__(self, clock: Clock, connection: mqtt.Connection, keepalive: int) -> None:
        self.clock = clock
        self.conn = connection
        self.keepalive = keepalive  # seconds; the broker's Server Keep Alive replaces it
        self.closing = False
        self.paused = False  # the subclass stopped reading: the broker's answers wait in the kernel, unseen
        self._heard = 0.0
        self._pinger: LoopingCall | None = None
        self._deadline: Any = None
        self._cut: Any = None

    # -- what a subclass gives -------------------------------------------

    def connect_packet(self) -> mqtt.Connect:
        raise NotImplementedError

    def accepted(self, connack: mqtt.ConnAck) -> None:
        """The broker accepted the connection (the deadline is met unless the subclass holds it)."""
        self.deadline_met()

    def handle(self, event: object) -> None:
        """Every event but CONNACK and DISCONNECT (PINGRESP only shows the broker is there)."""

    def refused(self, connack: mqtt.ConnAck) -> None:
        self.fail(f"the broker refused the connection: {mqtt.reason_text(connack.reason, connack.properties)}")

    def disconnected(self, event: mqtt.Disconnect) -> None:
        self.fail(f"the broker disconnected: {mqtt.reason_text(event.reason, event.properties)}")

    def failed(self, why: str) -> None:
        """Why the connection is being left (before the close): the subclass logs or records it."""

    def ended(self, reason: Failure) -> None:
        """The connection is gone: closed by this side when ``closing`` is already true, else by the broker or
        the network."""

    def may_read(self) -> bool:
        """Whether to take more events now (False: they wait in the codec until ``process`` is called)."""
        return True

    # -- the connection --------------------------------------------------

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self._heard = self.clock.seconds()
        self.transport.write(self.conn.send(self.connect_packet()))
        self._deadline = self.clock.callLater(self.connack_timeout, self._late)

    def _late(self) -> None:
        self._deadline = None
        self.fail(self.too_slow.format(seconds=self.connack_timeout))

    def deadline_met(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self._heard = self.clock.seconds()
        self.conn.receive_data(data)
        self.process()

    def process(self) -> None:
        """Take the events that have arrived, while ``may_read`` says so."""
        if self.closing or not self.may_read():
            return
        try:
            for event in self.conn.events():
                if isinstance(event, mqtt.ConnAck):
                    self._connack(event)
                elif isinstance(event, mqtt.Disconnect):
                    self.disconnected(event)
                else:
                    self.handle(event)
                if self.closing or not self.may_read():
                    return
        except mqtt.RemoteProtocolError as e:
            self.fail(f"the broker broke the protocol: {e.message}")

    def _connack(self, event: mqtt.ConnAck) -> None:
        if event.reason >= 0x80:
            self.refused(event)
            return
        keepalive = mqtt.prop(event.properties, P.SERVER_KEEP_ALIVE, self.keepalive)
        if keepalive:
            self.keepalive = keepalive
            self._pinger = LoopingCall(self._ping)
            self._pinger.clock = self.clock
            self._pinger.start(keepalive / 2, now=False)
        self.accepted(event)

    def _ping(self) -> None:
        if self.paused:
            self._heard = self.clock.seconds()  # not reading is not the broker's silence
        elif self.clock.seconds() - self._heard > 1.5 * self.keepalive:
            self.fail(f"the broker said nothing for {1.5 * self.keepalive:g} seconds")
            return
        self.send(mqtt.PingReq())

    def send(self, event: mqtt.Event) -> None:
        """Encode and write an event; mqtt.LocalProtocolError when it cannot be sent (too large, say)."""
        self.transport.write(self.conn.send(event))

    def fail(self, why: str) -> None:
        """Leave the connection for ``why``."""
        if self.closing:
            return
        self.failed(why)
        self.close()

    def close(self) -> None:
        """Close (after a DISCONNECT the subclass sent, or none); cut it if the broker does not let go."""
        if self.closing:
            return
        self.closing = True
        self._stop_timers()
        if self.paused:
            # TLS closes once the broker's close_notify is read: a paused transport would never read it.
            self.transport.resumeProducing()
        self.transport.loseConnection()
        self._cut = self.clock.callLater(self.close_timeout, self.transport.abortConnection)

    def _stop_timers(self) -> None:
        self.deadline_met()
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._stop_timers()
        if self._cut is not None and self._cut.active():
            self._cut.cancel()
        self.ended(reason)  # ``closing`` still says whether this side had closed it
        self.closing = True
