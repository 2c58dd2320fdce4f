"""
Commands: what people and programs send to a device, kept in the command
ledger (PostgreSQL) and delivered over the device's transport.

Theory of operation. A command is committed to the ledger before the API
answers; from then on it is in one of the states of ``model.STATES`` and
every change of state is recorded (a trigger writes ``command_events`` and
sends ``NOTIFY gateway_commands`` in the transaction that changes it). Every
gateway LISTENs; the one that holds the device's downlink (an MQTT session
subscribed to its command topic, a TGP v3 session, a Modbus poller, an HTTPS
long poll) claims the command (``queued`` → ``sent``, with its name in the
row) and sends it. The device's acknowledgement makes it ``delivered``; its
result ``succeeded`` or ``failed``. Until acknowledged a command is sent
again, with the same id, whenever the device's downlink comes back and every
``resend`` seconds while it stays: a gateway killed between sending and the
acknowledgement therefore sends it again after its restart, and a device that
follows its protocol's rule (deduplicate by id) runs it once. A claim leaves
a command alone while another gateway's send is younger than ``resend``, so
two gateways never send it at once. Past its expiry a command not finished
is ``expired``; ``canceled`` by a person before it was delivered.
"""
