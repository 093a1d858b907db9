"""The ipferry config: a TOML file validated by a pydantic schema.

A refused config names the key, the value, the reason and, where the file has it, the line::

    ipferry.toml:7: admin.listen = '0.0.0.0:9180': admin must listen on loopback (...)

Every key declares, next to it, what a reload does with it (:class:`Reload`: ``LIVE`` or kept
until a restart); :meth:`Config.reloaded` and the table in docs/configuration.md are worked out
from those declarations (``python -m ipferry.supervisor.config --reload-table``). The sections only
the workers use (``[flows]``, ``[audit]``, ``[app]``, ``[http]``) are those of
``ipferry.runtime.settings``. Secrets (``admin.token``, HTTP on-ramp tokens) are never echoed.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import os
import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from ipferry.nsd.addressing import capacity, worker_block
from ipferry.runtime.paths import default_runtime_dir
from ipferry.runtime.settings import (
    App,
    Audit,
    Flows,
    GueSettings,
    Http,
    HttpOnrampSettings,
    NetworkSettings,
    RuleSettings,
    SiteSettings,
    TcpOnrampSettings,
    WorkerSettings,
)
from ipferry.wire.dnsmsg import valid_domain_pattern
from ipferry.worker.app import TENANT_PATTERN, import_application

MAX_WORKERS = 128
# The default application's tenant syntax (1-64 of A-Z a-z 0-9 . _ : @ -, starting alphanumeric):
# a rule or an on-ramp naming another tenant could never match.
Tenant = Annotated[str, Field(pattern=rf"^{TENANT_PATTERN}$")]


class ConfigError(Exception):
    """A config that must not be started; ``str()`` is the list of problems, one a line."""


NO_VALUE: Any = type("NoValue", (), {"__repr__": lambda self: "NO_VALUE"})()


class Located(ValueError):
    """Problems a check across keys found, each at its own key: ``(loc, value, reason)`` with
    ``loc`` relative to the model that raised it (``("sites", 1, "prefixes", 0)``), so that
    :func:`parse` names each key and its line as it does pydantic's own errors (``value``
    :data:`NO_VALUE`: none shown)."""

    def __init__(self, problems: list[tuple[tuple, Any, str]]) -> None:
        super().__init__("; ".join(reason for _, _, reason in problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- what a reload does with each key -----------------------------------------------------------

@dataclass(frozen=True)
class Reload:
    """A key's reload behaviour, declared next to it as ``Annotated[type, LIVE]`` (or another
    instance): ``live``, the running daemon takes the reloaded value; ``restart``, it keeps the
    value it runs with until it is restarted, and a reload that changes the key names it in its
    reply. A key of a table type may declare it for the whole table, else each of its keys does.
    ``note`` is what docs/configuration.md says of it; keys with the same declaration share a row.
    """

    when: Literal["live", "restart"]
    note: str


KEPT = Reload("restart", "Keep their running values until the next restart, in workers started "
              "after the reload too (a GUE on-ramp's `allow` and `tenants` are those it was bound "
              "with; a rebuilt nsd uses the namespace, `offload` included, the daemon started "
              "with). A reload that changes one names it in its reply: `reloaded; changes to "
              "namespace, flows take effect at the next restart`.")
FIXED_FOR_WORKERS = Reload(
    "restart", "Fixed at daemon start: the supervisor gives every worker, running or started "
    "after the reload (crash restart, `ipferry restart-worker`), the limits, timeouts, connect "
    "timeout, audit sink, DNS upstreams and HTTP limits the daemon started with, so all workers "
    "run alike. A reload that changes them names the section (`flows`, `audit`, `dns`, `http`) "
    "in its reply; they apply at the next daemon restart. (A new `audit.sink` is still opened "
    "once, to check it.)")
LIVE_TOKEN = Reload("live", "The next mutating request is checked against the new setting.")
LIVE_LOG_LEVEL = Reload("live", "The supervisor, nsd and every worker (and children started "
                        "later). A `--log-level` given on the command line still wins.")
LIVE_SUPERVISION = Reload("live", "Backoff, crash-loop limit and window, and `stop_timeout` "
                          "apply to the next death or stop; `start_timeout` to the next nsd "
                          "rebuild.")
LIVE_APPLICATION = Reload(
    "live", "In two steps: every equipped worker first builds a new application object from the "
    "new settings (a new instance of `class`, or the rules application with the new rules and "
    "`default_action`; a module already imported is not re-imported), and only when all have "
    "built it do they switch to it, and the supervisor to the new config. If one cannot (its "
    "constructor raises, or it does not answer within 10 s), the reload is refused with that "
    "worker's error (`worker 1: cannot build the application: RuntimeError: ...`) and every "
    "process keeps the old config, workers started later included. The new application decides "
    "flows and parses tunnel contexts from then on, and receives `on_flow_end` for flows ending "
    "after the reload. Flows already decided keep their decision; open tunnels keep their "
    "context.")
KEPT_ROUTES = Reload(
    "restart", "Fixed at daemon start: the supervisor checks every tunnel's claim of routes "
    "against the networks the daemon started with, the sites it started with stay its static "
    "routes, and every worker (started after the reload too) is given those. A reload that "
    "changes them names `networks` / `sites` in its reply; they apply at the next daemon "
    "restart.")


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9180 or [::1]:9180")
    return host.strip("[]"), int(port)


def _ip_port(value: str, example: str, *, port_zero: bool = True) -> str:
    """``IP:PORT`` with an IP literal (IPv6 in brackets): a name would be resolved on the data
    path, blocking it."""
    host, port = _host_port(value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"expected an IP address and a port, e.g. {example} "
                         f"(no host names)") from None
    if port == 0 and not port_zero:
        raise ValueError("the port must be 1..65535")
    return value


def _network_list(v, *, strings: bool = False):
    """Networks, host bits allowed (``10.1.2.3/8`` means ``10.0.0.0/8``), as rules take them;
    with ``strings``, only written as strings (no TOML integer taken for an address)."""
    if not isinstance(v, list):
        return v
    out = []
    for item in v:
        if strings and not isinstance(item, str):
            raise ValueError(f"{item!r}: not a network (write it as a string, e.g. "
                             f"\"10.77.0.0/16\")")
        try:
            out.append(ipaddress.ip_network(item, strict=False) if isinstance(item, str)
                       else item)
        except ValueError as exc:
            raise ValueError(f"{item!r}: not a network ({exc})") from None
    return out


def _network(v):
    if not isinstance(v, str):
        raise ValueError('expected an IPv4 or IPv6 network as a string, e.g. "10.77.0.0/16"')
    try:
        return ipaddress.ip_network(v, strict=False)
    except ValueError as exc:
        raise ValueError(f"not an IPv4 or IPv6 network ({exc})") from None


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TunnelOnramp(_Strict):
    """A connected IP tunnel: SOCK_SEQPACKET; first datagram the context, then one packet each."""

    kind: Literal["tunnel"] = "tunnel"
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")] = "tunnel"
    path: Path | None = None  # default: <runtime dir>/<name>.sock
    mode: Annotated[int, Field(ge=0, le=0o777)] = 0o660
    backlog: Annotated[int, Field(ge=1, le=65535)] = 1024

    def socket_path(self) -> Path:
        return self.path or default_runtime_dir() / f"{self.name}.sock"


class GueOnramp(_Strict):
    """An unconnected IP tunnel: GUE in UDP, one IP packet a datagram, the context in its header.

    Every worker has a socket in the port's SO_REUSEPORT group; a classic-BPF program steers each
    datagram to the owner of its inner flow. Whoever can send to the port can claim any tenant:
    it listens on loopback unless an ``allow`` list of source networks says who may send.
    """

    kind: Literal["gue"]
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")] = "gue"
    listen: str = "127.0.0.1:6080"
    allow: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []  # source networks; [] = any
    tenants: list[Tenant] = []  # accepted tenants; [] = any
    receive_buffer: Annotated[int, Field(ge=65536, le=1 << 30)] = 4 << 20
    # One of several nodes behind ECMP on the same address (docs/scale-out.md): a mid-flow TCP
    # packet of a flow this node never saw is another node's (reset, counted not_this_node).
    anycast: bool = False

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, _ = _host_port(v)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError("expected an IP address and a port, e.g. 127.0.0.1:6080 or "
                             "[::1]:6080") from None
        return v

    @field_validator("allow", mode="before")
    @classmethod
    def _networks(cls, v):
        return _network_list(v)

    @model_validator(mode="after")
    def _not_open_to_all(self) -> GueOnramp:
        if not ipaddress.ip_address(self.address()[0]).is_loopback and not self.allow:
            raise ValueError(f"a GUE on-ramp on {self.listen} (not loopback) needs an allow list "
                             f"of source networks: whoever can send to it can claim any tenant")
        return self

    def address(self) -> tuple[str, int]:
        return _host_port(self.listen)


def _onramp_kind(value) -> str:
    if isinstance(value, dict):
        return value.get("kind", "tunnel")
    return getattr(value, "kind", "tunnel")


class TcpOnramp(_Strict):
    """Publishes a service: every TCP connection accepted on ``listen`` is a flow of ``tenant``
    to ``upstream`` (e.g. a device of the tenant's private network), optionally behind a PROXY
    v2 header. Whoever can connect opens flows as the tenant: it listens on loopback unless an
    ``allow`` list of source networks says who may connect."""

    kind: Literal["tcp"]
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")] = "tcp"
    listen: str
    tenant: Tenant
    upstream: str
    proxy_protocol: bool = False
    allow: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []  # source networks; [] = any
    backlog: Annotated[int, Field(ge=1, le=65535)] = 1024

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        return _ip_port(v, "127.0.0.1:8443 or [::1]:8443")

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str) -> str:
        return _ip_port(v, "10.77.0.2:443 or [fd77::2]:443", port_zero=False)

    @field_validator("allow", mode="before")
    @classmethod
    def _networks(cls, v):
        return _network_list(v)

    @model_validator(mode="after")
    def _not_open_to_all(self) -> TcpOnramp:
        if not ipaddress.ip_address(self.address()[0]).is_loopback and not self.allow:
            raise Located([(("listen",), self.listen,
                            f"a TCP on-ramp on {self.listen} (not loopback) needs an allow list "
                            f"of source networks: whoever can connect to it opens flows as "
                            f"tenant {self.tenant}")])
        return self

    def address(self) -> tuple[str, int]:
        return _host_port(self.listen)

    def upstream_address(self) -> tuple[str, int]:
        return _host_port(self.upstream)


MIN_TOKEN = 16
MAX_TOKEN = 1024
MAX_TOKENS = 256  # per HTTP on-ramp
MAX_ALL_TOKENS = 512  # over all HTTP on-ramps: the workers' settings fit one control message


def _token_problem(token: str) -> str | None:
    """What is wrong with a proxy token (never quoting it), or None."""
    if len(token) < MIN_TOKEN:
        return f"the token must have at least {MIN_TOKEN} characters"
    if len(token) > MAX_TOKEN:
        return f"the token must have at most {MAX_TOKEN} characters"
    if not all("!" <= c <= "~" for c in token):
        return ("the token must be printable ASCII without spaces (a client sends it in a "
                "Proxy-Authorization header)")
    return None


class ProxyToken(_Strict):
    """A credential of an HTTP on-ramp: a client presenting ``token`` (as the password of
    ``Proxy-Authorization: Basic``, or as ``Proxy-Authorization: Bearer``) is of ``tenant``.
    The secret is ``token`` or the content of ``token_file`` (read at start and at every reload,
    :meth:`Config.check_runtime`); workers are given only its SHA-256."""

    tenant: Tenant
    token: SecretStr | None = None
    token_file: Path | None = None
    _read: SecretStr | None = PrivateAttr(None)  # token_file's content, as read at start

    @field_validator("token")
    @classmethod
    def _token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and (why := _token_problem(v.get_secret_value())) is not None:
            raise ValueError(why)
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ProxyToken:
        if self.token is not None and self.token_file is not None:
            raise Located([(("token_file",), str(self.token_file),
                            "set token or token_file, not both")])
        if self.token is None and self.token_file is None:
            raise Located([(("token",), NO_VALUE,
                            "set token or token_file: the secret a client presents")])
        return self

    def read_file(self) -> str:
        """``token_file``'s token, read now (stripped), else a ConfigError's reason."""
        assert self.token_file is not None
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise ValueError("not text: the token must be printable ASCII") from None
        if (why := _token_problem(token)) is not None:
            raise ValueError(why)
        return token

    def secret(self) -> str:
        """The token: ``token``, or ``token_file``'s as first read (kept: a file rewritten later
        counts at the next restart, as the on-ramp's other keys)."""
        if self.token is not None:
            return self.token.get_secret_value()
        if self._read is None:
            self._read = SecretStr(self.read_file())
        return self._read.get_secret_value()

    def digest(self) -> str:
        """What workers are given: the SHA-256 (hex) of the token."""
        return hashlib.sha256(self.secret().encode()).hexdigest()


class HttpOnramp(_Strict):
    """A forward proxy: every request (or ``CONNECT`` tunnel) a client sends through it is a
    flow of ``tenant``, or of the tenant its ``Proxy-Authorization`` token maps to. Whoever can
    connect opens flows as the tenant: it listens on loopback unless an ``allow`` list of source
    networks says who may connect."""

    kind: Literal["http"]
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")] = "http"
    listen: str = "127.0.0.1:3128"
    tenant: Tenant | None = None  # clients without a token; None: a token is required
    tokens: Annotated[list[ProxyToken], Field(max_length=MAX_TOKENS)] = []
    allow: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []  # source networks; [] = any
    backlog: Annotated[int, Field(ge=1, le=65535)] = 1024

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        return _ip_port(v, "127.0.0.1:3128 or [::1]:3128")

    @field_validator("allow", mode="before")
    @classmethod
    def _networks(cls, v):
        return _network_list(v)

    @model_validator(mode="after")
    def _checks(self) -> HttpOnramp:
        if self.tenant is None and not self.tokens:
            raise Located([(("tenant",), NO_VALUE,
                            "an HTTP on-ramp needs a tenant or tokens: tenant = \"...\" for "
                            "every client, or [[onramps.tokens]] (tenant, token or token_file) "
                            "for clients presenting a Proxy-Authorization token")])
        problems: list[tuple[tuple, Any, str]] = []
        seen: dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            if t.token is None:
                continue  # a file's token is read at start (check_runtime)
            secret = t.token.get_secret_value()
            if secret in seen:
                problems.append((("tokens", i, "token"), NO_VALUE,
                                 f"the same token as tokens[{seen[secret]}]: each token names "
                                 f"one tenant"))
            seen.setdefault(secret, i)
        if not ipaddress.ip_address(self.address()[0]).is_loopback and not self.allow:
            who = (f"opens flows as tenant {self.tenant}" if self.tenant is not None else
                   "may try tokens, which cross the network in clear")
            problems.append((("listen",), self.listen,
                             f"an HTTP on-ramp on {self.listen} (not loopback) needs an allow "
                             f"list of source networks: whoever can connect to it {who}"))
        if problems:
            raise Located(problems)
        return self

    def address(self) -> tuple[str, int]:
        return _host_port(self.listen)

    def token_problems(self, index: int) -> list[str]:
        """Each token file that cannot be read, or holds a bad or repeated token, as
        ``onramps[INDEX].tokens[I].token_file = 'PATH': REASON`` (``index``: the on-ramp's)."""
        problems = []
        seen: dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            try:
                secret = t.secret()
            except ValueError as exc:
                problems.append(f"onramps[{index}].tokens[{i}].token_file = "
                                f"{str(t.token_file)!r}: {exc}")
                continue
            if secret in seen:
                key = "token_file" if t.token_file is not None else "token"
                shown = f" = {str(t.token_file)!r}" if t.token_file is not None else ""
                problems.append(f"onramps[{index}].tokens[{i}].{key}{shown}: the same token as "
                                f"tokens[{seen[secret]}]: each token names one tenant")
            seen.setdefault(secret, i)
        return problems

    def settings(self) -> HttpOnrampSettings:
        """What workers are given: the tokens' hashes, never the tokens."""
        return HttpOnrampSettings(tenant=self.tenant,
                                  tokens={t.digest(): t.tenant for t in self.tokens},
                                  allow=[str(n) for n in self.allow], address=self.address())


Onramp = Annotated[Annotated[TunnelOnramp, Tag("tunnel")] | Annotated[GueOnramp, Tag("gue")]
                   | Annotated[TcpOnramp, Tag("tcp")] | Annotated[HttpOnramp, Tag("http")],
                   Discriminator(_onramp_kind)]
ONRAMP_KINDS = ("tunnel", "gue", "tcp", "http")


class Admin(_Strict):
    listen: Annotated[str | None, KEPT] = "127.0.0.1:9180"
    unix_socket: Annotated[Path | None, KEPT] = None  # default: <runtime dir>/admin.sock; "" off
    token: Annotated[Annotated[str, Field(min_length=16)] | None, LIVE_TOKEN] = None
    token_file: Annotated[Path | None, LIVE_TOKEN] = None

    @field_validator("listen")
    @classmethod
    def _loopback_only(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        host, _ = _host_port(v)
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError("admin must listen on loopback (127.0.0.0/8, ::1) or a unix socket")
        return v

    @model_validator(mode="after")
    def _one_token_source(self) -> Admin:
        if self.token and self.token_file:
            raise ValueError("set admin.token or admin.token_file, not both")
        return self

    def check_token_file(self) -> None:
        """At start and reload (not in check-config: a credential may exist only for the service)."""
        if not self.token_file:
            return
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"admin.token_file = {str(self.token_file)!r}: cannot read "
                              f"({exc.strerror})") from None
        if len(token) < 16:
            raise ConfigError(f"admin.token_file = {str(self.token_file)!r}: the token must have "
                              f"at least 16 characters")

    def listen_address(self) -> tuple[str, int] | None:
        return _host_port(self.listen) if self.listen else None

    def unix_socket_path(self) -> Path | None:
        if self.unix_socket is None:
            return default_runtime_dir() / "admin.sock"
        return self.unix_socket if str(self.unix_socket) not in ("", ".") else None

    def bearer_token(self) -> str | None:
        """The token now (a token file is re-read, so rotating it needs no reload)."""
        if self.token_file:
            try:
                return self.token_file.read_text().strip() or None
            except OSError:
                return None  # unreadable now: mutations are refused (403), never let through
        return self.token


class Namespace(_Strict):
    mtu: Annotated[int, Field(ge=1280, le=65520)] = 65520
    # TSO superframes and partial checksums on the worker TUNs (see ipferry.wire.vnet).
    offload: bool = True
    tun_prefix: Annotated[str, Field(pattern=r"^[a-z][a-z0-9]{0,9}$")] = "ipf"
    ipv4_pool: ipaddress.IPv4Network = ipaddress.IPv4Network("100.64.0.0/10")
    ipv4_block_prefix: Annotated[int, Field(ge=8, le=28)] = 16
    ipv6_pool: ipaddress.IPv6Network = ipaddress.IPv6Network("fd69:7066::/48")
    ipv6_block_prefix: Annotated[int, Field(ge=48, le=120)] = 64
    sysctls: dict[str, str] = {}

    @field_validator("sysctls")
    @classmethod
    def _net_only(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not re.fullmatch(r"net\.[a-z0-9_.\-]+", key):
                raise ValueError(f"{key!r}: only net.* sysctls belong to the namespace")
        return v

    def max_workers(self) -> int:
        return min(capacity(self.ipv4_pool, self.ipv4_block_prefix),
                   capacity(self.ipv6_pool, self.ipv6_block_prefix))

    def blocks(self, workers: int):
        return [worker_block(i, ipv4_pool=self.ipv4_pool, ipv4_prefix=self.ipv4_block_prefix,
                             ipv6_pool=self.ipv6_pool, ipv6_prefix=self.ipv6_block_prefix,
                             tun_prefix=self.tun_prefix) for i in range(workers)]


class Supervision(_Strict):
    backoff_initial: Annotated[float, Field(gt=0, le=60)] = 0.5
    backoff_max: Annotated[float, Field(gt=0, le=600)] = 30.0
    crash_loop_limit: Annotated[int, Field(ge=1)] = 5  # restarts within the window, then give up
    crash_loop_window: Annotated[float, Field(gt=0)] = 60.0
    stop_timeout: Annotated[float, Field(gt=0, le=300)] = 10.0
    start_timeout: Annotated[float, Field(gt=0, le=300)] = 30.0


class Logging(_Strict):
    format: Annotated[Literal["json", "console"], KEPT] = "json"
    level: Annotated[Literal["debug", "info", "warning", "error"], LIVE_LOG_LEVEL] = "info"




class Dns(_Strict):
    """The resolver tunnels reach at the daemon's DNS address (100.100.100.100, fd53::53, port
    53, UDP and TCP; ``ipferry connect`` names it in the command's resolv.conf): queries are
    forwarded to ``upstreams`` (``IP`` or ``IP:PORT``; default: the host's own resolvers, the
    ``nameserver`` lines of ``resolv_conf`` when the daemon starts, loopback stubs included)."""

    upstreams: Annotated[list[str], Field(max_length=8)] = []
    resolv_conf: Path = Path("/etc/resolv.conf")  # where the host's resolvers are read

    @field_validator("upstreams")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        for item in v:
            dns_upstream(item)
        return v

    def resolved(self) -> list[tuple[str, int]]:
        """The upstreams as (address, port), the host's resolvers when none are configured."""
        if self.upstreams:
            return [dns_upstream(u) for u in self.upstreams]
        return host_resolvers(self.resolv_conf)


def dns_upstream(value: str) -> tuple[str, int]:
    """``IP`` or ``IP:PORT`` (``[IPV6]:PORT``) as (address, port); port 53 by default."""
    host, port = value, 53
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else -1
    elif value.count(":") == 1:
        host, _, text = value.partition(":")
        port = int(text) if text.isdigit() else -1
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r}: expected an IP address, optionally with :PORT") from None
    if not 0 < port < 65536:
        raise ValueError(f"{value!r}: the port must be 1..65535")
    return host, port


def host_resolvers(path: Path) -> list[tuple[str, int]]:
    """The ``nameserver`` lines of a resolv.conf (at most 3, as the C library reads)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                out.append((str(ipaddress.ip_address(words[1].partition("%")[0])), 53))
            except ValueError:
                continue
    return out[:3]


MAX_RULE_PATH = 1024
MAX_RULE_METHOD = 32
_HTTP_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")  # RFC 9110's token


class Rule(_Strict):
    """One policy rule; the first that matches a new flow decides it."""

    action: Literal["allow", "deny"]
    name: str = ""
    tenant: Tenant | None = None
    protocol: Literal["tcp", "udp", "icmp"] | None = None
    cidr: str | None = None
    ports: str | None = None  # "80" or "8000-8080"
    upstream: str | None = None  # HOST:PORT to off-ramp to instead of the original destination
    layer: Literal["ip", "stream", "http"] | None = None  # how an allowed flow is carried
    # A rule for queries to the daemon's resolver instead of flows: "corp.example" (that name)
    # or "*.corp.example" (any name under it); deny answers NXDOMAIN.
    domain: str | None = None
    # Flows to the addresses the daemon's resolver answered a matching name with (the same
    # patterns): "allow *.corp.example" for IP flows; HTTP requests with such a Host.
    host: str | None = None
    path: str | None = None  # HTTP requests whose path starts so ("/admin")
    method: str | None = None  # HTTP requests of this method ("POST"), upper case
    sni: str | None = None  # TLS streams whose ClientHello names a matching server

    @field_validator("domain", "host", "sni")
    @classmethod
    def _domain(cls, v: str | None) -> str | None:
        if v is not None and (why := valid_domain_pattern(v)) is not None:
            raise ValueError(why)
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith("/"):
            raise ValueError('expected a path starting with "/", e.g. "/admin" (it matches '
                             'request paths by prefix)')
        if len(v) > MAX_RULE_PATH:
            raise ValueError(f"longer than {MAX_RULE_PATH} characters")
        if not all("!" <= c <= "~" for c in v):
            raise ValueError("printable ASCII only, no spaces (percent-encode others, as "
                             "requests send them: %20)")
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not _HTTP_TOKEN.fullmatch(v) or len(v) > MAX_RULE_METHOD:
            raise ValueError(f"expected an HTTP method, e.g. \"GET\" or \"POST\" (1-"
                             f"{MAX_RULE_METHOD} letters, digits or !#$%&'*+-.^_`|~)")
        return v.upper()

    @model_validator(mode="after")
    def _domain_alone(self) -> Rule:
        if self.domain is not None and (self.cidr or self.ports or self.protocol or self.upstream
                                        or self.layer or self.host or self.path or self.method
                                        or self.sni):
            raise ValueError("a rule with a domain decides DNS queries: it takes no cidr, "
                             "ports, protocol, upstream, layer, host, path, method or sni")
        return self

    @model_validator(mode="after")
    def _http_keys(self) -> Rule:
        """sni decides TLS streams, path and method HTTP requests: none decides how a flow is
        carried, so none takes ``layer`` or ``upstream``."""
        if self.domain is not None:
            return self  # refused above if it has any
        problems: list[tuple[tuple, Any, str]] = []
        if self.sni is not None:
            for key in ("path", "method", "host", "upstream", "layer"):
                if (value := getattr(self, key)) is not None:
                    problems.append(((key,), value, "a rule with sni decides TLS streams by "
                                     "their ClientHello: it takes no path, method, host, "
                                     "upstream or layer"))
        elif self.path is not None or self.method is not None:
            for key in ("layer", "upstream"):
                if (value := getattr(self, key)) is not None:
                    problems.append(((key,), value, "a rule with path or method decides HTTP "
                                     "requests, not flows: it takes no layer or upstream"))
        if (self.sni is not None or self.path is not None or self.method is not None) and \
                self.protocol not in (None, "tcp"):
            problems.append((("protocol",), self.protocol, "a rule with sni, path or method "
                             "matches TCP streams only: protocol can only be \"tcp\""))
        if problems:
            raise Located(problems)
        return self

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str | None) -> str | None:
        if v is not None:
            ipaddress.ip_network(v, strict=False)  # raises ValueError with a clear message
        return v

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: str | None) -> str | None:
        if v is None:
            return v
        lo, _, hi = v.partition("-")
        if not (lo.isdigit() and (hi or lo).isdigit() and 0 <= int(lo) <= int(hi or lo) <= 65535):
            raise ValueError("expected a port (80) or an inclusive range (8000-8080)")
        return v

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str | None) -> str | None:
        if v is not None:
            host, _ = _host_port(v)
            try:  # a name would be resolved on the data path, blocking it: literals only
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError("expected an IP address and a port, e.g. 10.0.0.5:8080 or "
                                 "[fd00::5]:8080 (no host names)") from None
        return v

    def port_range(self) -> tuple[int, int] | None:
        if self.ports is None:
            return None
        lo, _, hi = self.ports.partition("-")
        return int(lo), int(hi or lo)

    def for_workers(self, position: int) -> RuleSettings:
        return RuleSettings(action=self.action, name=self.name or str(position),
                            tenant=self.tenant, protocol=self.protocol, cidr=self.cidr,
                            ports=self.port_range(),
                            upstream=_host_port(self.upstream) if self.upstream else None,
                            layer=self.layer, domain=self.domain, host=self.host,
                            path=self.path, method=self.method, sni=self.sni)




MAX_NETWORKS = 1024
MAX_SITES = 256
MAX_SITE_PREFIXES = 64  # per site, as a tunnel claims at most 64
MAX_ALL_SITE_PREFIXES = 1024  # over all sites: the workers' settings fit one control message


class Network(_Strict):
    """Addresses a tenant's devices may claim: each tenant is its own address space."""

    tenant: Tenant
    cidr: IPNetwork

    @field_validator("cidr", mode="before")
    @classmethod
    def _cidr(cls, v):
        return _network(v)


class Site(_Strict):
    """A static route: a GUE sender that is a device of ``tenant`` holding ``prefixes``."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
    tenant: Tenant
    prefixes: Annotated[list[IPNetwork], Field(min_length=1, max_length=MAX_SITE_PREFIXES)]
    sender: str
    onramp: str | None = None  # a GUE on-ramp's name; default: the only one

    @field_validator("prefixes", mode="before")
    @classmethod
    def _prefixes(cls, v):
        return _network_list(v, strings=True)

    @field_validator("sender")
    @classmethod
    def _sender(cls, v: str) -> str:
        return _ip_port(v, "192.0.2.7:6080 or [2001:db8::7]:6080", port_zero=False)

    def sender_address(self) -> tuple[str, int]:
        return _host_port(self.sender)


def _describe(networks: list[IPNetwork]) -> str:
    shown = ", ".join(map(str, networks[:8]))
    return shown + (f", ... ({len(networks)} in all)" if len(networks) > 8 else "")


def _one_tunnel_onramp() -> list[Onramp]:
    return [TunnelOnramp()]


class Config(_Strict):
    # At most 128: a worker's equip message carries a mesh fd per peer (SCM_MAX_FD is 253).
    workers: Annotated[Annotated[int, Field(ge=1, le=MAX_WORKERS)] | None,
                       KEPT] = None  # default: the CPUs
    # This daemon's name in a fleet: a `node` label on every metric, a field in every log line
    # and audit record (docs/scale-out.md). None: no such label or field.
    node: Annotated[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")] | None,
                    KEPT] = None
    onramps: Annotated[list[Onramp], Field(max_length=32), KEPT] = Field(
        default_factory=_one_tunnel_onramp)
    admin: Admin = Admin()
    namespace: Annotated[Namespace, KEPT] = Namespace()
    supervision: Annotated[Supervision, LIVE_SUPERVISION] = Supervision()
    logging: Logging = Logging()
    flows: Annotated[Flows, FIXED_FOR_WORKERS] = Flows()
    app: Annotated[App, LIVE_APPLICATION] = App()
    rules: Annotated[list[Rule], LIVE_APPLICATION] = []
    audit: Annotated[Audit, FIXED_FOR_WORKERS] = Audit()
    networks: Annotated[list[Network], Field(max_length=MAX_NETWORKS), KEPT_ROUTES] = []
    sites: Annotated[list[Site], Field(max_length=MAX_SITES), KEPT_ROUTES] = []
    dns: Annotated[Dns, FIXED_FOR_WORKERS] = Dns()
    http: Annotated[Http, FIXED_FOR_WORKERS] = Http()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        names = [o.name for o in self.onramps]
        if len(set(names)) != len(names):
            raise ValueError(f"on-ramp names must be unique, got {names}")
        if self.workers and self.workers > self.namespace.max_workers():
            raise ValueError(f"{self.workers} workers need more blocks than namespace pools "
                             f"hold ({self.namespace.max_workers()})")
        problems = self._private_network_problems()
        tokens = [(i, o) for i, o in enumerate(self.onramps) if isinstance(o, HttpOnramp)]
        if sum(len(o.tokens) for _, o in tokens) > MAX_ALL_TOKENS:
            i, o = tokens[-1]
            problems.append((("onramps", i, "tokens"), NO_VALUE,
                             f"{sum(len(o.tokens) for _, o in tokens)} tokens over all HTTP "
                             f"on-ramps, over {MAX_ALL_TOKENS}"))
        if problems:
            raise Located(problems)
        return self

    def _private_network_problems(self) -> list[tuple[tuple, Any, str]]:
        """Networks of one tenant do not overlap; each site is of a known GUE on-ramp and holds
        prefixes inside its tenant's networks that no other site prefix of the tenant overlaps."""
        problems: list[tuple[tuple, Any, str]] = []
        by_tenant: dict[str, list[tuple[int, IPNetwork]]] = {}
        for i, net in enumerate(self.networks):
            mine = by_tenant.setdefault(net.tenant, [])
            for j, other in mine:
                if net.cidr.version == other.version and net.cidr.overlaps(other):
                    problems.append((("networks", i, "cidr"), str(net.cidr),
                                     f"{net.cidr} overlaps {other} (networks[{j}]) of tenant "
                                     f"{net.tenant}: a tenant's networks may not overlap"))
                    break
            else:
                mine.append((i, net.cidr))
        gue = [o.name for o in self.onramps if isinstance(o, GueOnramp)]
        names: dict[str, int] = {}
        held: dict[str, list[tuple[IPNetwork, str]]] = {}  # by tenant: (prefix, site)
        total = 0
        for i, site in enumerate(self.sites):
            if site.name in names:
                problems.append((("sites", i, "name"), site.name,
                                 f"site names must be unique: sites[{names[site.name]}] is "
                                 f"{site.name} too"))
            names.setdefault(site.name, i)
            if site.onramp is not None and site.onramp not in gue:
                problems.append((("sites", i, "onramp"), site.onramp,
                                 f"no GUE on-ramp {site.onramp} (GUE on-ramps: "
                                 f"{', '.join(gue) or 'none'})"))
            elif site.onramp is None and len(gue) != 1:
                problems.append((("sites", i, "onramp"), NO_VALUE,
                                 "a site needs a GUE on-ramp: there is none" if not gue else
                                 f"name the site's GUE on-ramp (onramp = one of "
                                 f"{', '.join(gue)})"))
            networks = [n for _, n in by_tenant.get(site.tenant, [])]
            total += len(site.prefixes)
            for k, prefix in enumerate(site.prefixes):
                loc = ("sites", i, "prefixes", k)
                if not any(prefix.version == n.version and prefix.subnet_of(n)  # type: ignore[arg-type]
                           for n in networks):
                    problems.append((loc, str(prefix),
                                     f"{prefix} is outside tenant {site.tenant}'s networks "
                                     f"({_describe(networks) or 'none: add [[networks]]'})"))
                    continue
                mine_held = held.setdefault(site.tenant, [])
                clash = next(((p, name) for p, name in mine_held
                              if p.version == prefix.version and p.overlaps(prefix)), None)
                if clash is not None:
                    problems.append((loc, str(prefix),
                                     f"{prefix} overlaps {clash[0]} of site {clash[1]}"))
                    continue
                mine_held.append((prefix, site.name))
        if total > MAX_ALL_SITE_PREFIXES:
            problems.append((("sites", len(self.sites) - 1, "prefixes"), NO_VALUE,
                             f"{total} site prefixes in all, over {MAX_ALL_SITE_PREFIXES}"))
        return problems

    def site_onramp(self, site: Site) -> str:
        """The GUE on-ramp a site speaks to: the one it names, else the only one."""
        if site.onramp is not None:
            return site.onramp
        return next(o.name for o in self.onramps if isinstance(o, GueOnramp))

    def check_runtime(self) -> None:
        """What only the running daemon can check (at start and reload): the token file, and
        what :meth:`check_startable` checks."""
        self.admin.check_token_file()
        self.check_token_files()
        self.check_startable()

    def check_token_files(self) -> None:
        """The HTTP on-ramps' token files (at start and reload, as ``admin.token_file``; not in
        check-config: a credential may exist only for the service): each readable, holding a
        token of at least 16 characters no other token of its on-ramp has. Each is read once:
        the token the daemon started with is kept until a restart."""
        problems = [problem for i, o in enumerate(self.onramps) if isinstance(o, HttpOnramp)
                    for problem in o.token_problems(i)]
        if problems:
            raise ConfigError("\n".join(problems))

    def check_startable(self) -> None:
        """What ``run`` refuses that the file alone does not show, checked by ``check-config``
        too: the application class imports, the audit sink can be opened for append. Creates
        nothing: a sink file that does not exist yet needs a writable directory."""
        if self.app.cls:
            try:
                import_application(self.app.cls)
            except Exception as exc:  # whatever importing the application's module raised
                raise ConfigError(f"app.class = {self.app.cls!r}: cannot import: {exc}") from None
        if self.audit.sink != "stdout":
            check_audit_sink(self.audit.sink)

    def worker_settings(self, workers: int) -> WorkerSettings:
        """What the workers are given of this config (``workers``: how many the daemon runs).
        Of an HTTP on-ramp's tokens, only their SHA-256: the secrets stay here."""
        self.check_token_files()  # read already at start (check_runtime): kept, not re-read
        return WorkerSettings(
            workers=workers, node=self.node or "", mtu=self.namespace.mtu,
            offload=self.namespace.offload,
            flows=self.flows, audit=self.audit, app=self.app,
            rules=[r.for_workers(i) for i, r in enumerate(self.rules)],
            gue={o.name: GueSettings(allow=[str(n) for n in o.allow], tenants=list(o.tenants),
                                     address=o.address(), anycast=o.anycast)
                 for o in self.onramps if isinstance(o, GueOnramp)},
            tcp={o.name: TcpOnrampSettings(tenant=o.tenant, upstream=o.upstream_address(),
                                           proxy_protocol=o.proxy_protocol,
                                           allow=[str(n) for n in o.allow], address=o.address())
                 for o in self.onramps if isinstance(o, TcpOnramp)},
            http_onramps={o.name: o.settings() for o in self.onramps if isinstance(o, HttpOnramp)},
            http=self.http,
            networks=[NetworkSettings(tenant=n.tenant, cidr=str(n.cidr)) for n in self.networks],
            sites=[SiteSettings(name=s.name, tenant=s.tenant, prefixes=[str(p) for p in s.prefixes],
                                sender=s.sender_address(), onramp=self.site_onramp(s))
                   for s in self.sites],
            dns_upstreams=self.dns.resolved())

    def reloaded(self, new: Config) -> tuple[Config, list[str]]:
        """The config a running daemon has after reloading ``new`` (this one is what it runs
        with): ``new``'s value of every live key, this one's of the others; and the keys that
        differ between the two and so wait for a restart."""
        update: dict[tuple[str, ...], Any] = {}
        needs_restart = []
        for path, rule in reload_rules():
            if rule.when == "live":
                update[path] = _get(new, path)
            elif _get(self, path) != _get(new, path):
                needs_restart.append(".".join(path))
        return _replace(self, update), needs_restart

    def worker_count(self, override: int | None = None) -> int:
        n = override or self.workers or os.cpu_count() or 1
        if n > MAX_WORKERS:
            raise ConfigError(f"workers = {n}: at most {MAX_WORKERS}")
        if n > self.namespace.max_workers():
            raise ConfigError(f"workers = {n}: the namespace pools hold blocks for "
                              f"{self.namespace.max_workers()} workers")
        return n


def reload_rules(model: type[BaseModel] = Config,
                 prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Reload]]:
    """Every key's (path, reload declaration), in the order of the schema."""
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        rule = next((m for m in field.metadata if isinstance(m, Reload)), None)
        if rule is not None:
            yield path, rule
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from reload_rules(field.annotation, path)
        else:
            raise TypeError(f"config key {'.'.join(path)} declares no reload behaviour")


def check_audit_sink(sink: str) -> None:
    """Whether a worker could open ``sink`` for append (as it does: O_APPEND|O_CREAT), without
    creating it: an existing file is opened for append, else its directory must be writable."""
    path = Path(sink)
    try:
        if path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))
            return
        parent = path.parent
        if not parent.is_dir():
            raise ConfigError(f"audit.sink = {sink!r}: its directory {str(parent)!r} does not "
                              f"exist; create it or choose another path")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"audit.sink = {sink!r}: cannot create it, its directory "
                              f"{str(parent)!r} is not writable; fix the permissions or choose "
                              f"another path")
    except OSError as exc:
        raise ConfigError(f"audit.sink = {sink!r}: cannot open for append ({exc.strerror}); "
                          f"fix its permissions or choose another path") from None


def _get(config: BaseModel, path: tuple[str, ...]) -> Any:
    for name in path:
        config = getattr(config, name)
    return config


def _replace(config: BaseModel, update: dict[tuple[str, ...], Any]) -> Any:
    """``config`` with the values at the given paths replaced (the models are frozen)."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[tuple[str, ...], Any]] = {}
    for path, value in update.items():
        if len(path) == 1:
            top[path[0]] = value
        else:
            nested.setdefault(path[0], {})[path[1:]] = value
    for name, inner in nested.items():
        top[name] = _replace(getattr(config, name), inner)
    return config.model_copy(update=top)


def _key_label(path: tuple[str, ...]) -> str:
    model: Any = Config
    for name in path[:-1]:
        model = model.model_fields[name].annotation
    annotation = model.model_fields[path[-1]].annotation
    dotted = ".".join(path)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"`[{dotted}]`"
    if getattr(annotation, "__origin__", None) is list and path in (
            ("onramps",), ("rules",), ("networks",), ("sites",)):
        return f"`[[{dotted}]]`"
    return f"`{dotted}`"


def reload_table() -> str:
    """The table of docs/configuration.md's Reload section, from the keys' declarations."""
    rows: dict[Reload, list[str]] = {}
    for path, rule in reload_rules():
        rows.setdefault(rule, []).append(_key_label(path))
    lines = ["| key | on reload | what happens |", "| --- | --- | --- |"]
    for rule, keys in rows.items():
        when = "live" if rule.when == "live" else "at restart"
        lines.append(f"| {', '.join(keys)} | {when} | {rule.note} |")
    return "\n".join(lines) + "\n"


TABLE_START = "<!-- reload-table: generated by `python -m ipferry.supervisor.config --reload-table`"
TABLE_END = "<!-- end of reload-table -->"


def with_reload_table(doc: str) -> str:
    """``doc`` (docs/configuration.md) with its reload table replaced by the generated one."""
    head, start, rest = doc.partition(TABLE_START)
    marker, _, rest = rest.partition("\n")
    _, end, tail = rest.partition(TABLE_END)
    if not start or not end:
        raise ValueError(f"no reload table between {TABLE_START!r} and {TABLE_END!r}")
    return f"{head}{start}{marker}\n{reload_table()}{end}{tail}"


def _find_line(text: str, loc: tuple) -> int | None:
    """Best effort: the line of the key at ``loc`` (e.g. ('admin', 'listen')) in the TOML text."""
    keys = [k for k in loc if isinstance(k, str)]
    if not keys:
        return None
    lines = text.splitlines()
    if sum(isinstance(k, int) for k in loc) > 1 and isinstance(loc[0], str):
        return _find_nested_line(lines, loc)
    table, key = keys[:-1], keys[-1]
    start = 0
    if table:
        header = re.compile(r"^\s*\[\[?\s*" + re.escape(".".join(table)) + r"\s*\]\]?\s*$")
        # An index in loc (onramps[1]) means the n-th [[onramps]] header.
        nth = next((k for k in loc if isinstance(k, int)), 0)
        seen = -1
        for i, line in enumerate(lines):
            if header.match(line):
                seen += 1
                if seen == nth:
                    start = i
                    break
        else:
            return None
    key_re = re.compile(r"^\s*" + re.escape(key) + r"\s*=")
    for i in range(start, len(lines)):
        if i > start and table and lines[i].lstrip().startswith("["):
            break
        if key_re.match(lines[i]):
            return i + 1
    return start + 1 if table else None


def _find_nested_line(lines: list[str], loc: tuple) -> int | None:
    """:func:`_find_line` of a key in an array of tables in an array of tables
    (``("onramps", 1, "tokens", 0, "token")``: ``[[onramps.tokens]]`` headers after the second
    ``[[onramps]]``), or an element of an array in one (``("sites", 1, "prefixes", 0)``: the
    line of ``prefixes =``)."""
    lo, hi, table = 0, len(lines), ""
    parts = list(loc)
    while parts:
        name = parts.pop(0)
        if not isinstance(name, str):
            continue
        index = parts.pop(0) if parts and isinstance(parts[0], int) else None
        path = f"{table}.{name}" if table else name
        header = re.compile(r"^\s*\[\[?\s*" + re.escape(path) + r"\s*\]\]?\s*$")
        hits = [i for i in range(lo, hi) if header.match(lines[i])]
        if len(hits) > (index or 0):  # a table (of an array): its lines
            lo = hits[index or 0]
            if not parts:
                return lo + 1
            inside = re.compile(r"^\s*\[\[?\s*" + re.escape(path) + r"\.")
            hi = next((i for i in range(lo + 1, hi) if lines[i].lstrip().startswith("[")
                       and not inside.match(lines[i])), hi)
            table = path
            continue
        key_re = re.compile(r"^\s*" + re.escape(name) + r"\s*=")
        for i in range(lo + 1 if table else 0, hi):
            if table and lines[i].lstrip().startswith("["):
                break
            if key_re.match(lines[i]):
                return i + 1
        break
    return lo + 1 if table else None


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def parse(text: str, source: str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        at = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        where = f"{source}:{at.group(1)}" if at else source
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            if loc[:1] == ("onramps",) and len(loc) > 2 and loc[2] in ONRAMP_KINDS:
                loc = loc[:2] + loc[3:]  # the on-ramp kind pydantic chose, not a key of the file
            located = err.get("ctx", {}).get("error")
            if isinstance(located, Located):  # a check across keys: each problem at its key
                found = [(loc + sub, value, reason) for sub, value, reason in located.problems]
            else:
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] == "extra_forbidden":
                    msg = "unknown key"
                found = [(loc, err.get("input"), msg)]
            for where_loc, value, msg in found:
                line = _find_line(text, where_loc)
                where = f"{source}:{line}" if line else source
                shown = f" = {value!r}" if value is not NO_VALUE and not isinstance(
                    value, dict | list) else ""
                if shown and ("token" in where_loc or (
                        "tokens" in where_loc and where_loc[-1] not in ("tenant", "token_file"))):
                    shown = " = <redacted>"  # never echo a secret into logs
                problems.append(f"{where}: {_dotted(where_loc)}{shown}: {msg}")
        raise ConfigError("\n".join(problems)) from None


def load(path: str | os.PathLike | None) -> Config:
    """The config at ``path``, or the built-in default when ``path`` is None."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    return parse(text, str(p))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ipferry.supervisor.config",
                                     description="The config schema's generated documentation.")
    parser.add_argument("--reload-table", action="store_true", required=True,
                        help="print the table of what a reload does with each key")
    parser.add_argument("--write", metavar="FILE",
                        help="replace the table in FILE (docs/configuration.md) instead")
    args = parser.parse_args(argv)
    if args.write:
        path = Path(args.write)
        path.write_text(with_reload_table(path.read_text()))
    else:
        sys.stdout.write(reload_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
