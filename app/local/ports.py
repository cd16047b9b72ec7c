"""Free TCP ports on loopback for the local stack (`txroute up --ports auto`) and the tests.

Why not `bind(("127.0.0.1", 0))` and hand the number on: the kernel picks that port from its ephemeral range
(`net.ipv4.ip_local_port_range`, 32768-60999 by default), the same range it draws from for every outgoing
connection's source port and every other `bind(0)`. Between closing the probe and the service binding the
port, any of those can take it. Nor can the socket itself be handed over: PostgreSQL binds its own listening
socket, and granian takes no inherited descriptor.

So a port is chosen where the kernel never hands ports out by itself, and claimed among choosers:
  1. candidates lie below the ephemeral range, from PORT_AUTO_LO up, starting at a random offset;
  2. a candidate is reserved by binding an abstract Unix socket named after it (`\\0txroute-port-<n>`): the
     kernel grants each name once per network namespace, so two `txroute up` or test processes choosing at
     the same moment never get the same port, and the reservation ends by itself when its holder exits;
  3. the port must then bind on 127.0.0.1 (nothing already listens there), and the reservation is held until
     the caller's services listen (`Reservation.release`).
What remains possible: a process outside txroute binding that exact fixed port below the ephemeral range
in the same second; and, once `up` has released its reservation, another chooser taking the port of a part
that is stopped later (a game day's stopped PostgreSQL, `txroute ops restart`) before it listens again.
Either way that part then fails to start with its log naming the port, never silently.
"""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass, field
from pathlib import Path

from app import limits

PORT_AUTO_LO = 20_000  # above the well-known and registered ports that development machines commonly use
_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_EPHEMERAL_LO_DEFAULT = 32_768
_RESERVATION_PREFIX = b"\0txroute-port-"


class NoFreePort(RuntimeError):
    """Fewer free ports than asked for below the kernel's ephemeral range."""


@dataclass
class Reservation:
    """Ports claimed by this process; each stays claimed until `release` (or until the process exits)."""

    ports: list[int]
    _holds: list[socket.socket] = field(default_factory=list, repr=False)

    def release(self) -> None:
        for hold in self._holds:
            hold.close()
        self._holds.clear()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def ephemeral_lo() -> int:
    """The lowest port the kernel picks by itself (for bind(0) and outgoing connections)."""
    try:
        return int(_EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _EPHEMERAL_LO_DEFAULT


def reserve(count: int) -> Reservation:
    """`count` distinct free ports on 127.0.0.1, none in the ephemeral range, reserved against other choosers."""
    assert 1 <= count <= limits.PORTS_AUTO_COUNT_MAX, count
    hi = ephemeral_lo()
    if hi - PORT_AUTO_LO < count:
        raise NoFreePort(f"the kernel's ephemeral range starts at {hi}: no room for {count} ports above "
                         f"{PORT_AUTO_LO}; use fixed ports (--router-port, --region-port-base, --pg-port-base)")
    span = hi - PORT_AUTO_LO
    start = random.SystemRandom().randrange(span)
    reservation = Reservation([])
    tried = 0
    while len(reservation.ports) < count and tried < min(span, limits.PORTS_AUTO_CANDIDATES_MAX):
        port = PORT_AUTO_LO + (start + tried) % span
        tried += 1
        hold = _claim(port)
        if hold is None:
            continue
        if not bindable(port):
            hold.close()
            continue
        reservation.ports.append(port)
        reservation._holds.append(hold)
    if len(reservation.ports) < count:
        reservation.release()
        raise NoFreePort(f"found {len(reservation.ports)} of {count} free ports in {tried} tried "
                         f"between {PORT_AUTO_LO} and {hi}")
    return reservation


def _claim(port: int) -> socket.socket | None:
    hold = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        hold.bind(_RESERVATION_PREFIX + str(port).encode())
    except OSError:  # another process holds this port's reservation
        hold.close()
        return None
    return hold


def bindable(port: int) -> bool:
    """Nothing is bound to 127.0.0.1:`port`. The probe does not set SO_REUSEADDR, so a port that still has
    connections in TIME_WAIT counts as taken too: whatever the service's own socket options, it can bind."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# Ports the tests reserve for their own clusters and services; held for the whole test process.
_session: list[Reservation] = []


def free_port() -> int:
    """One free port, reserved until this process exits (tests and benchmarks start many short-lived
    services; a port never goes back to the pool while they might still use it)."""
    reservation = reserve(1)
    _session.append(reservation)
    return reservation.ports[0]
