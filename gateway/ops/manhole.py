"""
The SSH console (``--manhole``): a Python prompt inside the running
gateway, for administrators. ``twisted.conch`` provides SSH and the
interpreter; this module adds what a production console needs:

- Public keys only. The portal has one checker, for public keys, so the
  server offers no other method: passwords and keyboard-interactive are
  refused before they are tried. Keys are read from an OpenSSH
  ``authorized_keys`` file at each login, so adding or removing a key needs
  no restart (a small local file, read once per login). Ed25519, ECDSA and
  RSA keys log in (RSA with SHA-2 signatures: ``server-sig-algs`` says which
  user key algorithms are taken, not only the host key's). A line's
  ``from="..."`` and ``expiry-time="..."`` options are honoured; a line with
  an option the console cannot honour is not used, and the log says why.
  Each login is logged with the key's SHA256 fingerprint.
- Connections that have not logged in are not sessions: each has 30
  seconds to log in, and at most ``MAX_UNAUTHENTICATED`` wait at once (past
  that the one waiting longest is dropped), so idle connections can never
  lock an administrator out. At most ``MAX_SESSIONS`` logged-in consoles
  are open at once; one that sends nothing for 15 minutes is closed.
- Modern algorithms only: curve25519 or ECDH key exchange, AES-CTR, SHA-2
  MACs (see ``KEY_EXCHANGES``; conch lacks strict key exchange, and the
  Terrapin attack it guards against needs an algorithm not offered here).
- A persistent Ed25519 host key in ``DATA_DIR/manhole/``, made on first
  start with ``cryptography`` and written 0600, so clients can pin it.
- Each factory has its own key dictionaries (conch's ``ConchFactory`` keeps
  them on the class, shared by every instance).
- Sessions with a terminal (``ssh -p PORT admin@host``) get conch's
  colouring line editor; sessions without one (``ssh -T … < script``) get
  each line's answer alone, with no banner, prompt or terminal control; a command
  (``ssh … 'status()'``) runs, prints its result, and the session ends
  with exit status 0 (1 if it raised). Closing the client's input (EOF)
  ends any session cleanly, which conch's stock session does not handle.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any
from collections.abc import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch import manhole, manhole_ssh
from twisted.conch.insults import insults
from twisted.conch.interfaces import IConchUser, ISession
from twisted.conch.ssh import keys, transport as ssh_transport, userauth
from twisted.conch.ssh.connection import SSHConnection
from twisted.cred import portal
from twisted.cred.portal import IRealm
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.reactor import Clock
from gateway.files import write_private
from gateway.ops.authorized_keys import USER_KEY_ALGORITHMS, fingerprint, AuthorizedKeys

log = Logger()

HOST_KEY_NAME = "ssh_host_ed25519_key"
MAX_LINE = 64 * 1024  # longest line a plain session buffers
LOGIN_TIMEOUT = 30.0  # seconds from connecting to logged in
IDLE_TIMEOUT = 900.0  # seconds without a byte from the client before the console closes
MAX_SESSIONS = 4  # logged-in console connections open at once; more are told so and closed
MAX_UNAUTHENTICATED = 10  # connections not yet logged in; past it the one waiting longest is dropped


# What the console offers, a subset of conch's in conch's order of preference: of OpenSSH's
# current defaults, those conch implements. conch has no strict key exchange
# (kex-strict-*-v00@openssh.com), so the Terrapin attack is closed by offering neither
# chacha20-poly1305 nor an encrypt-then-MAC mode, the two it needs.
KEY_EXCHANGES = (
    b"curve25519-sha256",
    b"curve25519-sha256@libssh.org",
    b"ecdh-sha2-nistp256",
    b"ecdh-sha2-nistp384",
    b"ecdh-sha2-nistp521",
    b"diffie-hellman-group-exchange-sha256",
)
CIPHERS = (b"aes256-ctr", b"aes192-ctr", b"aes128-ctr")
MACS = (b"hmac-sha2-512", b"hmac-sha2-256")


class ManholeError(Exception):
    """The console cannot start; the message says why in one line."""


def host_key(directory: Path) -> tuple[keys.Key, bool]:
    """The console's host key, made (mode 0600) on first use; (key, made now?)."""
    path = directory / HOST_KEY_NAME
    made = False
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if directory.stat().st_mode & 0o077:  # it holds a private key: the owner's alone
            directory.chmod(0o700)
    except OSError as e:
        raise ManholeError(f"{str(directory)!r}: {e.strerror}") from None
    if not path.exists():
        private = ed25519.Ed25519PrivateKey.generate()
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        write_private(path, pem)
        public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        path.with_name(HOST_KEY_NAME + ".pub").write_bytes(public + b" txgateway-console\n")
        made = True
    try:
        return keys.Key.fromFile(str(path)), made
    except (OSError, keys.BadKeyError) as e:
        raise ManholeError(f"host key {str(path)!r} cannot be read: {e}") from None


class _PeerPortal:
    """The factory's portal, handing the checker the client's address along with its credentials."""

    def __init__(self, portal: Any, peer: str | None) -> None:
        self.portal = portal
        self.peer = peer

    def login(self, credentials: Any, mind: Any, *interfaces: Any) -> Deferred:
        credentials.peer = self.peer
        return self.portal.login(credentials, mind, *interfaces)

    def listCredentialsInterfaces(self) -> Any:
        return self.portal.listCredentialsInterfaces()


class ConsoleUserAuth(userauth.SSHUserAuthServer):
    def serviceStarted(self) -> None:
        super().serviceStarted()
        connection: Any = self.transport
        self.portal = _PeerPortal(self.portal, getattr(connection.transport.getPeer(), "host", None))


class ConsoleTransport(ssh_transport.SSHServerTransport):
    """
    conch's server transport, saying in server-sig-algs the user key algorithms taken (not the host key's),
    with the factory's login deadline, idle timer and count of logged-in consoles.
    """

    factory: ConsoleFactory
    login_timer: IDelayedCall  # set by the factory as it builds the transport
    idle_timer: IDelayedCall
    logged_in = False

    def sendExtInfo(self, extensions: list[tuple[bytes, bytes]]) -> None:
        super().sendExtInfo(
            [(k, b",".join(USER_KEY_ALGORITHMS) if k == b"server-sig-algs" else v) for k, v in extensions]
        )

    def dataReceived(self, data: bytes) -> None:
        if self.idle_timer.active():
            self.idle_timer.reset(self.factory.idle_timeout)
        super().dataReceived(data)

    def setService(self, service: Any) -> None:
        if isinstance(service, SSHConnection) and not self.logged_in:
            if not self.factory.logged_in(self):
                return
            self.logged_in = True
        super().setService(service)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.closed(self)
        super().connectionLost(reason)


class _Glue:
    """A transport made of two functions."""

    def __init__(self, write: Callable[[bytes], Any], lose: Callable[[], Any]) -> None:
        self.write = write
        self.loseConnection = lose
        self.disconnecting = False

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))


class PlainConsole(protocol.Protocol):
    """A prompt without terminal control: lines in, output out (ssh -T, scripts, commands)."""

    transport: Any  # set by makeConnection before any event; Twisted types it Optional

    def __init__(self, namespace: dict[str, Any], banner: str, prompt: bool = True) -> None:
        self.namespace = namespace
        self.banner = banner
        self.prompt = prompt
        self._buffer = b""
        self.failed = False
        self._line_open = False  # output so far does not end with a newline

    def connectionMade(self) -> None:
        self.interpreter = manhole.ManholeInterpreter(self, self.namespace)
        if self.prompt:
            self.transport.write(self.banner.encode() + b"\n>>> ")

    def addOutput(self, data: Any, isAsync: bool | None = None) -> None:
        text = data if isinstance(data, str) else data.decode("utf-8", "replace")
        if "Traceback (most recent call last)" in text or text.startswith("SyntaxError"):
            self.failed = True
        if text:
            self._line_open = not text.endswith("\n")
            self.transport.write(text.encode("utf-8"))

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_LINE:
            self._buffer = b""
            self.addOutput("line too long; discarded\n")
        for line in lines:
            self.run(line)

    def run(self, line: bytes) -> bool:
        more = self.interpreter.push(line)
        if self._line_open:  # a displayed result ends its line
            self.addOutput("\n")
        if self.prompt:
            self.transport.write(b"... " if more else b">>> ")
        return bool(more)

    def pending(self) -> list[Deferred]:
        return [d for _, d in self.interpreter._pendingDeferreds.values()]


class ConsoleSession(manhole_ssh.TerminalSession):
    """A session that handles no-terminal use, commands, window changes and EOF."""

    width, height = 80, 24
    namespace_factory: Callable[[], dict[str, Any]]
    banner: str

    def getPty(self, term: bytes, windowSize: Any, attrs: Any) -> None:
        self.height, self.width = windowSize[:2]
        self.pty = True

    def openShell(self, proto: Any) -> None:
        if getattr(self, "pty", False):
            namespace, banner = self.namespace_factory(), self.banner

            class Console(manhole.ColoredManhole):
                def initializeScreen(self) -> None:
                    self.terminal.reset()
                    self.terminal.write(banner.encode().replace(b"\n", b"\r\n") + b"\r\n")
                    self.terminal.write(self.ps[self.pn])
                    self.setInsertMode()

            self.terminal = insults.ServerProtocol(Console, namespace)
            self.transportFactory(proto, self.terminal, IConchUser(self.original), self.width, self.height)
            self.proto = proto
            return
        # Without a terminal (ssh -T, a pipe, a script) only the answers go out: no banner, no prompts.
        self._plain(proto, PlainConsole(self.namespace_factory(), self.banner, prompt=False))

    def execCommand(self, proto: Any, cmd: bytes) -> None:
        console = PlainConsole(self.namespace_factory(), self.banner, prompt=False)
        self._plain(proto, console)
        more = False
        for line in cmd.replace(b"\r\n", b"\n").split(b"\n"):
            more = console.run(line)
        if more and console.run(b""):
            console.addOutput("SyntaxError: the command is incomplete\n")
            console.failed = True
        self._finish_when_done(console)

    def _plain(self, proto: Any, console: PlainConsole) -> None:
        self.proto, self.console = proto, console
        proto.makeConnection(_Glue(console.dataReceived, self._end))
        console.makeConnection(_Glue(proto.write, self._end))

    def _finish_when_done(self, console: PlainConsole) -> None:
        pending = console.pending()
        if pending:
            d = pending[0]

            def again(result: Any) -> Any:
                self._finish_when_done(console)
                return result

            d.addBoth(again)
            return
        self._end(1 if console.failed else 0)

    def _end(self, status: int = 0) -> None:
        proto = getattr(self, "proto", None)
        if proto is None or getattr(self, "_ended", False):
            return
        self._ended = True
        reason = ProcessDone(None) if status == 0 else ProcessTerminated(status)
        proto.processEnded(Failure(reason))

    def windowChanged(self, newWindowSize: Any) -> None:
        self.height, self.width = newWindowSize[:2]
        terminal = getattr(self, "terminal", None)
        if terminal is not None and terminal.terminalProtocol is not None:
            terminal.terminalProtocol.terminalSize(self.width, self.height)

    def eofReceived(self) -> None:
        console = getattr(self, "console", None)
        if console is not None:
            if console._buffer:
                console.run(console._buffer)
                console._buffer = b""
            self._finish_when_done(console)
        else:
            self._end(0)


@implementer(IRealm)
class ConsoleRealm(manhole_ssh.TerminalRealm):
    def __init__(self, namespace: Callable[[], dict[str, Any]], banner: str) -> None:
        super().__init__()
        self.namespace = namespace
        self.banner = banner

    def _getAvatar(self, avatarId: bytes) -> Any:
        user = super()._getAvatar(avatarId)
        session = ConsoleSession(user.original)
        session.transportFactory = self.transportFactory
        session.namespace_factory = self.namespace
        session.banner = self.banner
        user.original.setComponent(ISession, session)
        return user


class ConsoleFactory(manhole_ssh.ConchFactory):
    """
    conch's factory, locked down: modern algorithms only (``KEY_EXCHANGES``,
    ``CIPHERS``, ``MACS``), a login deadline, an idle timeout, a bound on
    connections waiting to log in that drops the longest waiting, and a cap
    on logged-in consoles.
    """

    protocol = ConsoleTransport
    services = {b"ssh-userauth": ConsoleUserAuth, b"ssh-connection": SSHConnection}
    login_timeout = LOGIN_TIMEOUT
    idle_timeout = IDLE_TIMEOUT
    max_sessions = MAX_SESSIONS
    max_unauthenticated = MAX_UNAUTHENTICATED

    def __init__(self, portal: Any, clock: Clock) -> None:
        super().__init__(portal)
        self.clock = clock
        self.waiting: deque[Any] = deque()  # connections not logged in yet, oldest first
        self.sessions = 0  # logged in

    @property
    def open(self) -> int:
        return len(self.waiting) + self.sessions

    # conch's own annotations say bytes; the values are keys.Key objects
    publicKeys: dict[bytes, Any]
    privateKeys: dict[bytes, Any]

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.waiting) >= self.max_unauthenticated:
            oldest = self.waiting.popleft()
            log.warn(
                "console: dropped {peer}, not logged in yet, to make room ({count} connections were waiting)",
                peer=str(oldest.transport.getPeer()),
                count=self.max_unauthenticated,
            )
            oldest.transport.abortConnection()
        transport: Any = super().buildProtocol(addr)
        transport.supportedKeyExchanges = [k for k in transport.supportedKeyExchanges if k in KEY_EXCHANGES]
        transport.supportedCiphers = [c for c in transport.supportedCiphers if c in CIPHERS]
        transport.supportedMACs = [m for m in transport.supportedMACs if m in MACS]
        transport.supportedCompressions = [b"none"]  # no compression of secrets before the login
        self.waiting.append(transport)
        transport.login_timer = self.clock.callLater(self.login_timeout, self._too_slow, transport)
        transport.idle_timer = self.clock.callLater(self.idle_timeout, self._idle, transport)
        return transport

    def logged_in(self, transport: ConsoleTransport) -> bool:
        """A connection logs in: a console session, if one more may be open (else it is told why and closed)."""
        if transport in self.waiting:
            self.waiting.remove(transport)
        if transport.login_timer.active():
            transport.login_timer.cancel()
        if self.sessions >= self.max_sessions:
            log.warn(
                "console: refused a login from {peer}: {count} consoles are open (the most)",
                peer=str(transport.getPeer().address),
                count=self.sessions,
            )
            transport.sendDisconnect(
                ssh_transport.DISCONNECT_TOO_MANY_CONNECTIONS,
                f"{self.sessions} consoles are open, the most there may be; try again later".encode(),
            )
            return False
        self.sessions += 1
        return True

    def closed(self, transport: ConsoleTransport) -> None:
        if transport.logged_in:
            self.sessions -= 1
        elif transport in self.waiting:
            self.waiting.remove(transport)
        for timer in (transport.login_timer, transport.idle_timer):
            if timer.active():
                timer.cancel()

    def _idle(self, transport: Any) -> None:
        log.info(
            "console: closing {peer}, idle for {seconds:g}s",
            peer=str(transport.transport.getPeer()),
            seconds=self.idle_timeout,
        )
        transport.transport.loseConnection()

    @staticmethod
    def _too_slow(transport: Any) -> None:
        if not isinstance(transport.service, SSHConnection):  # still before (or during) the login
            log.warn("console: {peer} did not log in in time", peer=str(transport.transport.getPeer()))
            transport.transport.loseConnection()


def console_factory(
    key_dir: Path, authorized_keys: Path, namespace: Callable[[], dict[str, Any]], banner: str, clock: Clock
) -> ConsoleFactory:
    """An SSH factory for the console: public keys from ``authorized_keys``, a host key in ``key_dir``."""
    key, made = host_key(key_dir)
    keydb = AuthorizedKeys(authorized_keys)
    realm = ConsoleRealm(namespace, banner)
    factory = ConsoleFactory(portal.Portal(realm, [keydb]), clock)
    # conch keeps these on the class, shared by every factory: give this one its own.
    factory.publicKeys = {key.sshType(): key.public()}
    factory.privateKeys = {key.sshType(): key}
    log.info(
        "console: {what} host key {path}, fingerprint {fingerprint}",
        what="made" if made else "using",
        path=str(key_dir / HOST_KEY_NAME),
        fingerprint=fingerprint(key),
    )
    if keydb.count() == 0:
        log.warn(
            "console: no keys in {path}: nobody can log in until one is added (no restart needed)",
            path=str(authorized_keys),
        )
    return factory
