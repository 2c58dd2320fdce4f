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

import calendar
import fnmatch
import ipaddress
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch import manhole, manhole_ssh
from twisted.conch.error import ValidPublicKey
from twisted.conch.insults import insults
from twisted.conch.interfaces import IConchUser, ISession
from twisted.conch.ssh import keys, transport as ssh_transport, userauth
from twisted.conch.ssh.connection import SSHConnection
from twisted.cred import portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet import protocol
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.files import write_private

log = Logger()

HOST_KEY_NAME = "ssh_host_ed25519_key"
MAX_LINE = 64 * 1024  # longest line a plain session buffers
LOGIN_TIMEOUT = 30.0  # seconds from connecting to logged in
IDLE_TIMEOUT = 900.0  # seconds without a byte from the client before the console closes
MAX_SESSIONS = 4  # logged-in console connections open at once; more are told so and closed
MAX_UNAUTHENTICATED = 10  # connections not yet logged in; past it the one waiting longest is dropped

# User key signature algorithms taken (server-sig-algs, RFC 8308): no SHA-1 (ssh-rsa, ssh-dss).
USER_KEY_ALGORITHMS = (
    b"ssh-ed25519",
    b"ecdsa-sha2-nistp256",
    b"ecdsa-sha2-nistp384",
    b"ecdsa-sha2-nistp521",
    b"rsa-sha2-512",
    b"rsa-sha2-256",
)
# authorized_keys options that ask for nothing this console would do anyway: it forwards nothing and runs no rc.
IMPLIED_OPTIONS = frozenset({"no-port-forwarding", "no-agent-forwarding", "no-x11-forwarding", "no-user-rc"})

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


@dataclass(frozen=True)
class AuthorizedKey:
    """One usable line of authorized_keys: the key, and where and until when it may log in."""

    key: keys.Key
    comment: str
    sources: tuple[str, ...] = ()  # from="...": patterns; empty for anywhere
    expires: float | None = None  # expiry-time="...": epoch seconds

    def allows(self, peer: str | None, now: float) -> str | None:
        """None if a login from ``peer`` may use this key now, else why not."""
        if self.expires is not None and now >= self.expires:
            return "the key's expiry-time has passed"
        if self.sources and not _from_allows(self.sources, peer):
            return f"from={','.join(self.sources)!r} does not allow {peer}"
        return None


def _from_allows(patterns: tuple[str, ...], peer: str | None) -> bool:
    """OpenSSH's from= on the client's address: a negated match refuses, otherwise any match allows."""
    if peer is None:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    allowed = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern
        if "/" in body:
            try:
                matched = address in ipaddress.ip_network(body, strict=False)
            except ValueError:
                matched = False
        else:
            matched = fnmatch.fnmatchcase(str(address), body)
        if matched and negated:
            return False
        allowed = allowed or matched
    return allowed


def _split_options(line: str) -> tuple[list[str], str]:
    """
    A line's leading options and what follows them: comma-separated up to the first space outside double
    quotes, where values may hold commas, spaces and backslash-escaped characters.
    """
    options, current, quoted, i = [], [], False, 0
    while i < len(line):
        c = line[i]
        if c == "\\" and quoted and i + 1 < len(line):
            current.append(line[i + 1])
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == "," and not quoted:
            options.append("".join(current))
            current = []
        elif c.isspace() and not quoted:
            break
        else:
            current.append(c)
        i += 1
    if quoted:
        raise ValueError("an option's quotes are not closed")
    options.append("".join(current))
    return options, line[i:]


def _expiry(value: str) -> float:
    """expiry-time: YYYYMMDD[HHMM[SS]], local time as OpenSSH reads it (a trailing Z: UTC)."""
    utc = value.endswith("Z")
    digits = value[:-1] if utc else value
    if not digits.isdigit() or len(digits) not in (8, 12, 14):
        raise ValueError(f"expiry-time {value!r} is not YYYYMMDD[HHMM[SS]]")
    parts = time.strptime(digits.ljust(14, "0"), "%Y%m%d%H%M%S")
    return float(calendar.timegm(parts)) if utc else time.mktime(parts)


def parse_authorized_key(line: str) -> AuthorizedKey:
    """One line of an OpenSSH authorized_keys file; ValueError saying why it cannot be used."""
    fields = line.split(None, 1)
    options: list[str] = []
    if fields and not _looks_like_key_type(fields[0]):
        options, rest_of_line = _split_options(line)
        fields = rest_of_line.split(None, 1)
    if not fields:
        raise ValueError("no key")
    rest = fields[1].split(None, 1) if len(fields) > 1 else []
    if not rest:
        raise ValueError("no key data after the key type")
    try:
        key = keys.Key.fromString(f"{fields[0]} {rest[0]}".encode())
    except (keys.BadKeyError, ValueError, IndexError) as e:
        raise ValueError(f"the key cannot be read: {e}") from None
    sources: tuple[str, ...] = ()
    expires = None
    for option in options:
        name, _, value = option.partition("=")
        name = name.strip().lower()
        if name in IMPLIED_OPTIONS:
            continue
        if name == "from" and value:
            sources = tuple(p.strip() for p in value.split(",") if p.strip())
        elif name == "expiry-time" and value:
            expires = _expiry(value)
        else:
            raise ValueError(f"option {name!r} is not supported by the console (from= and expiry-time= are)")
    return AuthorizedKey(key, rest[1].strip() if len(rest) > 1 else "", sources, expires)


def _looks_like_key_type(word: str) -> bool:
    return word.startswith(("ssh-", "ecdsa-", "sk-"))


def fingerprint(key: keys.Key) -> str:
    """As ssh and ssh-keygen -l show it."""
    return "SHA256:" + key.fingerprint(format=keys.FingerprintFormats.SHA256_BASE64).rstrip("=")


@implementer(ICredentialsChecker)
class AuthorizedKeys:
    """
    The keys of one OpenSSH authorized_keys file, for any user name, read at each login; the checker that
    lets a login in only with one of them, from where and until when its line allows, signed with SHA-2.
    """

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, path: Path, now: Callable[[], float] = time.time) -> None:
        self.path = path
        self.now = now
        self._told: set[str] = set()  # lines whose refusal was logged already

    def entries(self) -> list[AuthorizedKey]:
        try:
            text = self.path.read_text("utf-8", "replace")
        except OSError as e:
            log.warn("console: {path} cannot be read: {error}", path=str(self.path), error=e.strerror)
            return []
        found = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                found.append(parse_authorized_key(line))
            except ValueError as e:
                if line not in self._told and len(self._told) < 1000:
                    self._told.add(line)
                    log.warn(
                        "console: {path} line {number} is not used: {why}", path=str(self.path), number=number, why=e
                    )
        return found

    def count(self) -> int:
        return len(self.entries())

    def requestAvatarId(self, credentials: Any) -> Deferred:
        peer = getattr(credentials, "peer", None)
        try:
            key = keys.Key.fromString(credentials.blob)
        except keys.BadKeyError:
            return fail(UnauthorizedLogin("not a key"))
        if credentials.algName not in USER_KEY_ALGORITHMS:
            log.warn(
                "console: {peer} offered a {algorithm} signature, not taken (SHA-1)",
                peer=peer,
                algorithm=credentials.algName.decode("ascii", "replace"),
            )
            return fail(UnauthorizedLogin("signature algorithm not taken"))
        listed = [entry for entry in self.entries() if entry.key == key]
        if not listed:
            return fail(UnauthorizedLogin("key not authorized"))
        reasons = [entry.allows(peer, self.now()) for entry in listed]
        if all(reasons):
            # A listed key is an operator's: saying why it was refused is worth a line each time.
            log.warn(
                "console: key {fingerprint} refused for {peer}: {why}",
                fingerprint=fingerprint(key),
                peer=peer,
                why=reasons[0],
            )
            return fail(UnauthorizedLogin("key not allowed here or now"))
        if not credentials.signature:
            return fail(ValidPublicKey())
        try:
            verified = key.verify(credentials.signature, credentials.sigData)
        except Exception:
            verified = False
        if not verified:
            return fail(UnauthorizedLogin("bad signature"))
        entry = listed[reasons.index(None)]
        log.info(
            "console: {user} logged in from {peer} with key {fingerprint} {comment}",
            user=credentials.username.decode("utf-8", "replace"),
            peer=peer,
            fingerprint=fingerprint(key),
            comment=entry.comment,
        )
        return succeed(credentials.username)


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

    def __init__(self, portal: Any, clock: Any) -> None:
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
    key_dir: Path, authorized_keys: Path, namespace: Callable[[], dict[str, Any]], banner: str, clock: Any
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
