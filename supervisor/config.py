"""The ipferry config: a TOML file validated by a pydantic schema.

A refused config names the key, the value, the reason and, where the file has it, the line::

    ipferry.toml:7: admin.listen = '0.0.0.0:9180': admin must listen on loopback (...)
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from ipferry.nsd.addressing import capacity, worker_block
from ipferry.runtime.paths import default_runtime_dir
from ipferry.worker.app import TENANT_PATTERN, import_application

MAX_WORKERS = 128
# The default application's tenant syntax (1-64 of A-Z a-z 0-9 . _ : @ -, starting alphanumeric):
# a rule or an on-ramp naming another tenant could never match.
Tenant = Annotated[str, Field(pattern=rf"^{TENANT_PATTERN}$")]


class ConfigError(Exception):
    """A config that must not be started; ``str()`` is the list of problems, one a line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9180 or [::1]:9180")
    return host.strip("[]"), int(port)


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
        if not isinstance(v, list):
            return v
        out = []
        for item in v:
            try:  # host bits are fine: 10.1.2.3/8 means 10.0.0.0/8
                out.append(ipaddress.ip_network(item, strict=False) if isinstance(item, str)
                           else item)
            except ValueError as exc:
                raise ValueError(f"{item!r}: not a network ({exc})") from None
        return out

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


Onramp = Annotated[Annotated[TunnelOnramp, Tag("tunnel")] | Annotated[GueOnramp, Tag("gue")],
                   Discriminator(_onramp_kind)]


class Admin(_Strict):
    listen: str | None = "127.0.0.1:9180"
    unix_socket: Path | None = None  # default: <runtime dir>/admin.sock; "" disables it
    token: Annotated[str, Field(min_length=16)] | None = None
    token_file: Path | None = None

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
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Flows(_Strict):
    """Flow tracking limits and idle timeouts (seconds, per state, like conntrack's)."""

    # None: 100,000, or fewer if the worker's fd limit cannot hold them (see the worker).
    max_per_worker: Annotated[int, Field(ge=1)] | None = None
    max_per_tenant: Annotated[int, Field(ge=1)] = 10_000
    # UDP and ICMP flows each hold a connected socket, so a local port of the host.
    max_datagram_per_tenant: Annotated[int, Field(ge=1)] = 1_000
    tcp_syn_sent: Annotated[float, Field(gt=0)] = 120.0
    tcp_established: Annotated[float, Field(gt=0)] = 7200.0
    tcp_fin_wait: Annotated[float, Field(gt=0)] = 120.0
    tcp_closing: Annotated[float, Field(gt=0)] = 60.0
    udp_unreplied: Annotated[float, Field(gt=0)] = 30.0  # no reply yet (a lone DNS query)
    udp_replied: Annotated[float, Field(gt=0)] = 120.0
    icmp: Annotated[float, Field(gt=0)] = 30.0
    upstream_connect_timeout: Annotated[float, Field(gt=0, le=300)] = 10.0


class Rule(_Strict):
    """One policy rule; the first that matches a new flow decides it."""

    action: Literal["allow", "deny"]
    name: str = ""
    tenant: Tenant | None = None
    protocol: Literal["tcp", "udp", "icmp"] | None = None
    cidr: str | None = None
    ports: str | None = None  # "80" or "8000-8080"
    upstream: str | None = None  # HOST:PORT to off-ramp to instead of the original destination

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


class App(_Strict):
    """The application hooks: a ``module:Class`` (default: rules from this file)."""

    cls: Annotated[str | None, Field(alias="class", pattern=r"^[\w.]+:\w+$")] = None
    default_action: Literal["allow", "deny"] = "allow"


class Audit(_Strict):
    """Where flow start/end records go: ``stdout`` or a JSON-lines file; what flows do while
    the sink fails (``continue``: fail open, the lost records counted; ``refuse``: fail closed,
    new flows refused); how often refusals past a limit are summed up in one record."""

    sink: str = "stdout"
    on_error: Literal["continue", "refuse"] = "continue"
    refusals_interval: Annotated[float, Field(ge=1, le=3600)] = 10.0


class Config(_Strict):
    # At most 128: a worker's equip message carries a mesh fd per peer (SCM_MAX_FD is 253).
    workers: Annotated[int, Field(ge=1, le=MAX_WORKERS)] | None = None  # default: the CPUs
    onramps: Annotated[list[Onramp], Field(max_length=32)] = Field(
        default_factory=lambda: [TunnelOnramp()])
    admin: Admin = Admin()
    namespace: Namespace = Namespace()
    supervision: Supervision = Supervision()
    logging: Logging = Logging()
    flows: Flows = Flows()
    app: App = App()
    rules: list[Rule] = []
    audit: Audit = Audit()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        names = [o.name for o in self.onramps]
        if len(set(names)) != len(names):
            raise ValueError(f"on-ramp names must be unique, got {names}")
        if self.workers and self.workers > self.namespace.max_workers():
            raise ValueError(f"{self.workers} workers need more blocks than namespace pools "
                             f"hold ({self.namespace.max_workers()})")
        return self

    def check_runtime(self) -> None:
        """What only the running daemon can check (at start and reload, not in check-config):
        the token file, the application class, the audit sink."""
        self.admin.check_token_file()
        if self.app.cls:
            try:
                import_application(self.app.cls)
            except Exception as exc:  # whatever importing the application's module raised
                raise ConfigError(f"app.class = {self.app.cls!r}: cannot import: {exc}") from None
        if self.audit.sink != "stdout":
            try:
                with open(self.audit.sink, "a"):
                    pass
            except OSError as exc:
                raise ConfigError(f"audit.sink = {self.audit.sink!r}: cannot open for append "
                                  f"({exc.strerror})") from None

    def worker_count(self, override: int | None = None) -> int:
        n = override or self.workers or os.cpu_count() or 1
        if n > MAX_WORKERS:
            raise ConfigError(f"workers = {n}: at most {MAX_WORKERS}")
        if n > self.namespace.max_workers():
            raise ConfigError(f"workers = {n}: the namespace pools hold blocks for "
                              f"{self.namespace.max_workers()} workers")
        return n


def _find_line(text: str, loc: tuple) -> int | None:
    """Best effort: the line of the key at ``loc`` (e.g. ('admin', 'listen')) in the TOML text."""
    keys = [k for k in loc if isinstance(k, str)]
    if not keys:
        return None
    table, key = keys[:-1], keys[-1]
    lines = text.splitlines()
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
            if loc[:1] == ("onramps",) and len(loc) > 2 and loc[2] in ("tunnel", "gue"):
                loc = loc[:2] + loc[3:]  # the on-ramp kind pydantic chose, not a key of the file
            line = _find_line(text, loc)
            where = f"{source}:{line}" if line else source
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            value = err.get("input")
            shown = f" = {value!r}" if not isinstance(value, dict | list) else ""
            if "token" in loc:
                shown = " = <redacted>"  # never echo a secret into logs
            problems.append(f"{where}: {_dotted(loc)}{shown}: {msg}")
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
