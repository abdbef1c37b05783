"""The collector's SSH server: authentication, caps, and nothing but the subsystem.

Policy lives in `CollectorSSHServer`, an `asyncssh.SSHServer` whose hooks deny by
default: public-key authentication only, the SSH user name must be the agent's name,
no port or agent or X11 forwarding, no environment variables, no shell, exec, SFTP or
PTY (see `session.py`). Caps bound what one peer can hold: connections overall and per
agent, channels per connection, and time (an authenticated connection without a channel
is closed after the idle timeout, one over its agent's cap after the handshake timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from collector.config import AgentEntry, CollectorConfig
from collector.report.outcomes import FanOut
from collector.serve.context import SessionContext
from collector.serve.session import BackhaulSession
from collector.store.files import Store
from common.errors import TransportError
from common.identity import AgentAuthenticator
from common.text import escape_control

log = logging.getLogger(__name__)
# What session_requested returns: the channel and its session, or False to refuse.
_NewSession = tuple[asyncssh.SSHServerChannel[bytes], BackhaulSession] | bool


def make_authenticator(config: CollectorConfig) -> AgentAuthenticator:
    """Listed keys and, when configured, certificates from the Backhaul CA.

    Raises:
        ConfigError: unreadable keys, a key listed twice, a bad revocation list.
    """
    return AgentAuthenticator(
        {a.name: a.public_key for a in config.agents if a.public_key is not None},
        config.server.ca_public_key,
        config.server.revocation_list,
    )


def _uncount(counter: Counter[str], key: str) -> None:
    """One fewer for ``key``; a key at zero is dropped, so the counter lists only live ones."""
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


@dataclass
class ConnectionCaps:
    """Live connection counts: overall, per authenticated agent, and per address of
    those not authenticated yet. With a cap on the last (off by default, as OpenSSH's
    PerSourceMaxStartups: agents behind one NAT address all connect at the scheduled
    minute), one host cannot fill the overall cap with handshakes it never finishes and
    lock the agents out until the login timeout."""

    max_total: int
    max_per_agent: int
    max_channels: int = 16  # per connection; twice as many are refused outright
    max_unauthenticated_per_address: int = 0  # 0: no cap
    total: int = 0
    per_agent: Counter[str] = field(default_factory=Counter)
    unauthenticated: Counter[str] = field(default_factory=Counter)  # by address
    live: set[asyncssh.SSHServerConnection] = field(default_factory=set)


class CollectorSSHServer(asyncssh.SSHServer):
    """One instance per incoming connection."""

    def __init__(self, ctx: SessionContext, auth: AgentAuthenticator, caps: ConnectionCaps,
                 agents: frozenset[str]) -> None:
        self._ctx = ctx
        self._agents = agents
        self._auth = auth
        self._caps = caps
        self._conn: asyncssh.SSHServerConnection | None = None
        self._peer = "?"
        self._address: str | None = None  # counted as not authenticated yet
        self._agent: str | None = None
        self._counted = False
        self._over_cap = False
        self._channels = 0
        self._timer: asyncio.TimerHandle | None = None
        self._lost = False

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._caps.live.add(conn)
        self._auth.attach(conn)
        peer = conn.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self._caps.total += 1
        self._counted = True
        if self._caps.total > self._caps.max_total:
            log.warning("refusing connection from %s: %d connections open (cap %d)",
                        self._peer, self._caps.total - 1, self._caps.max_total)
            conn.close()
            return
        if peer:
            self._address = str(peer[0])
            self._caps.unauthenticated[self._address] += 1
            waiting = self._caps.unauthenticated[self._address]
            cap = self._caps.max_unauthenticated_per_address
            if cap and waiting > cap:
                log.warning("refusing connection from %s: %d connections from that address "
                            "not authenticated yet (cap %d)", self._peer, waiting - 1, cap)
                conn.close()

    def _authenticated_or_gone(self) -> None:
        """Stop counting this connection as one of its address's handshakes."""
        if self._address is not None:
            _uncount(self._caps.unauthenticated, self._address)
            self._address = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._conn is not None:
            self._caps.live.discard(self._conn)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counted:
            self._caps.total -= 1
            self._counted = False
        self._authenticated_or_gone()
        if self._agent is not None:
            _uncount(self._caps.per_agent, self._agent)
            self._agent = None

    def begin_auth(self, username: str) -> bool:
        return self._auth.begin_auth(username)

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        ok = username in self._agents and self._auth.validate_public_key(username, key)
        if not ok:
            log.warning("refused key %s for user %r from %s", key.get_fingerprint(),
                        escape_control(username[:64]), self._peer)
        return ok

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return username in self._agents and self._auth.validate_ca_key(username, key)

    def auth_completed(self) -> None:
        assert self._conn is not None
        agent = self._conn.get_extra_info("username")
        self._authenticated_or_gone()
        self._agent = agent
        self._caps.per_agent[agent] += 1
        if self._caps.per_agent[agent] > self._caps.max_per_agent:
            self._over_cap = True
            log.warning("agent %s (%s) has %d connections open (cap %d): answering busy",
                        agent, self._peer, self._caps.per_agent[agent], self._caps.max_per_agent)
            # Long enough to hear "busy" on a channel, too short to hoard connection slots.
            self._close_after(self._ctx.handshake_timeout, "over its connection cap")
        else:
            self._close_after(self._ctx.idle_timeout, "no channel open")
        log.info("agent %s authenticated from %s", agent, self._peer)

    def session_requested(self) -> _NewSession:
        assert self._agent is not None and self._conn is not None
        try:
            self._auth.agent_for(self._agent, self._conn)
        except TransportError as exc:  # revoked or expired since login
            log.warning("refused a channel to agent %s (%s): %s", self._agent, self._peer, exc)
            return False
        cap = self._caps.max_channels
        if self._channels >= 2 * cap:
            log.warning("refused a channel to agent %s (%s): %d channels open (cap %d)",
                        self._agent, self._peer, self._channels, cap)
            return False
        busy = "too many connections from this agent" if self._over_cap else None
        if busy is None and self._channels >= cap:
            busy = "too many channels on this connection"
            log.warning("agent %s (%s) has %d channels open on one connection (cap %d): "
                        "answering busy", self._agent, self._peer, self._channels + 1, cap)
        chan = self._conn.create_server_channel()
        self._refuse_channel_requests(chan)
        self._channels += 1
        if not self._over_cap and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return chan, BackhaulSession(self._ctx, self._agent, self._peer, busy=busy,
                                     on_close=self._channel_closed)

    def _channel_closed(self) -> None:
        self._channels -= 1
        if self._channels == 0 and not self._over_cap and not self._lost:
            self._close_after(self._ctx.idle_timeout, "no channel open")

    def _close_after(self, delay: float, why: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._expire, delay, why)

    def _expire(self, delay: float, why: str) -> None:
        self._timer = None
        log.warning("closing the connection of agent %s (%s): %s for %.0f s", self._agent,
                    self._peer, why, delay)
        if self._conn is not None:
            self._conn.close()

    def _refuse_channel_requests(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        """Refuse environment variables, PTYs, X11 and agent forwarding on ``chan``, logged.

        asyncssh refuses the last three itself (see `CollectorServer._options`), silently,
        and accepts every environment variable; it has no session hook for either. It
        looks a request's handler up on the channel by name, so handlers set here take
        over. The collector never reads the environment either way.
        """
        refused: Counter[str] = Counter()

        def refuser(what: str, named: bool) -> Callable[[Any], bool]:
            def refuse(packet: Any) -> bool:
                detail = ""
                if named:  # the variable's name helps the administrator; its value not
                    detail = " " + escape_control(
                        bytes(packet.get_string())[:64].decode("utf-8", "replace"))
                refused[what] += 1
                log.log(logging.WARNING if refused[what] == 1 else logging.DEBUG,
                        "refused %s request%s from agent %s (%s)", what, detail, self._agent,
                        self._peer)
                return False
            return refuse

        for request, what, named in (("env", "env", True), ("pty_req", "PTY", False),
                                     ("x11_req", "X11 forwarding", False),
                                     ("auth_agent_req_at_openssh_dot_com", "agent forwarding",
                                      False)):
            setattr(chan, f"_process_{request}_request", refuser(what, named))

    # Forwarding of any kind is refused (asyncssh's default too); these hooks log it.
    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> bool:
        return self._refused("port forwarding to", f"{dest_host[:64]}:{dest_port}")

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return self._refused("remote port forwarding from", f"{listen_host[:64]}:{listen_port}")

    def unix_connection_requested(self, dest_path: str) -> bool:
        return self._refused("socket forwarding to", dest_path[:128])

    def unix_server_requested(self, listen_path: str) -> bool:
        return self._refused("remote socket forwarding from", listen_path[:128])

    def tun_requested(self, unit: int | None) -> bool:
        return self._refused("tunnel device", str(unit))

    def tap_requested(self, unit: int | None) -> bool:
        return self._refused("tap device", str(unit))

    def _refused(self, what: str, target: str) -> bool:
        log.warning("refused %s %s by agent %s (%s)", what, escape_control(target), self._agent,
                    self._peer)
        return False


def make_context(config: CollectorConfig, outcomes: FanOut) -> SessionContext:
    """The shared session context built from configuration."""
    return SessionContext(
        store=Store(config.storage.root),
        timezone=config.storage.timezone,
        outcomes=outcomes,
        idle_timeout=config.server.idle_timeout,
        # Newer keys: read with defaults so an older ServerConfig still works.
        handshake_timeout=config.server.handshake_timeout,
        min_upload_rate=config.server.min_upload_rate,
        min_upload_rate_window=config.server.min_upload_rate_window,
        clock_skew=config.server.clock_skew,
        max_backup_bytes=config.storage.max_backup_bytes,
        max_expansion=config.storage.max_expansion,
        allowed={a.name: a.databases for a in config.agents},
        agent_max_bytes={a.name: a.max_backup_bytes for a in config.agents},
    )


class CollectorServer:
    """The listening SSH server plus graceful shutdown (stop accepting, drain, cancel)."""

    def __init__(self, config: CollectorConfig, ctx: SessionContext) -> None:
        self.config = config
        self.ctx = ctx
        self.auth = make_authenticator(config)
        self.agents = frozenset(a.name for a in config.agents)
        self.caps = ConnectionCaps(config.server.max_connections,
                                   config.server.max_connections_per_agent,
                                   config.server.max_channels_per_connection,
                                   config.server.max_unauthenticated_per_address)
        self._server: asyncssh.SSHAcceptor | None = None

    def use_agents(self, agents: Sequence[AgentEntry], auth: AgentAuthenticator) -> None:
        """Apply a reloaded agent list to connections and backups that start from now on.

        Open connections keep the authenticator they were made with (it is handed to
        each connection when it is accepted), so their uploads run on undisturbed.
        """
        self.auth = auth
        self.agents = frozenset(a.name for a in agents)
        self.ctx.allowed.clear()
        self.ctx.allowed.update({a.name: a.databases for a in agents})
        self.ctx.agent_max_bytes.clear()
        self.ctx.agent_max_bytes.update({a.name: a.max_backup_bytes for a in agents})

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def _options(self) -> dict[str, Any]:
        server = self.config.server
        keys: list[Any] = [str(server.host_key)]
        if server.host_certificate is not None:
            keys = [(str(server.host_key), str(server.host_certificate))]
        return {
            "server_host_keys": keys,
            "login_timeout": server.login_timeout,
            "keepalive_interval": 30,
            "keepalive_count_max": 4,
            "allow_pty": False,
            "agent_forwarding": False,
            "x11_forwarding": False,
            "encoding": None,
            "max_pktsize": 256 * 1024,
            # How far an agent may send ahead of this collector's reading. An agent
            # whose collector lags holds that much in memory: with 8 MiB its peak RSS
            # rose from 70-72 to 75-84 MiB (bench/postgres.py --receiver-nice), with
            # 4 MiB it stayed at 71 MiB. 4 MiB still fills 80 MB/s at 50 ms round trip.
            "window": 4 * 1024 * 1024,
        }

    async def start(self) -> None:
        """Listen on the configured address.

        Raises:
            TransportError: the address cannot be bound.
        """
        server = self.config.server
        try:
            self._server = await asyncssh.create_server(
                lambda: CollectorSSHServer(self.ctx, self.auth, self.caps, self.agents),
                server.host, server.port, **self._options(),
            )
        except OSError as exc:
            raise TransportError(
                f"cannot listen on {server.host}:{server.port}: {exc.strerror}"
            ) from None
        log.info("listening on %s:%d", server.host, self.port)
        if self.auth.admits_nobody:
            log.warning("no agent is enrolled yet: enrol one with `backhaul-collector "
                        "enrol-agent NAME KEYFILE`, then reload (SIGHUP)")

    async def stop(self, drain_timeout: float = 60.0) -> None:
        """Stop accepting, let running requests finish for a while, then cancel them."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        tasks = set(self.ctx.tasks)
        if tasks:
            log.info("waiting up to %.0f s for %d running request(s)", drain_timeout, len(tasks))
            _, pending = await asyncio.wait(tasks, timeout=drain_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=10)
        # Closing the listener leaves accepted connections open; an agent must see the
        # collector go, not keep a half-dead connection.
        for conn in list(self.caps.live):
            conn.close()
