"""`txroute up --ports auto` and the tests' free ports (app/local/ports.py): ports outside the kernel's
ephemeral range, each reserved against every other chooser on the machine until released."""

from __future__ import annotations

import socket
import subprocess
import sys

from app.local import ports


def _claimed_elsewhere(port: int) -> bool:
    """Whether another process could reserve `port` now (it runs the same claim)."""
    code = f"from app.local import ports; import sys; sys.exit(0 if ports._claim({port}) is None else 1)"
    return subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0


def test_reserved_ports_are_distinct_bindable_and_never_from_the_ephemeral_range():
    with ports.reserve(7) as reservation:
        chosen = reservation.ports
        assert len(set(chosen)) == 7, chosen
        assert all(ports.PORT_AUTO_LO <= p < ports.ephemeral_lo() for p in chosen), chosen
        assert all(ports.bindable(p) for p in chosen), f"expected nothing bound on {chosen}"


def test_a_reserved_port_cannot_be_reserved_by_another_process_until_released():
    reservation = ports.reserve(1)
    port = reservation.ports[0]
    assert _claimed_elsewhere(port), f"expected port {port} reserved against other processes"
    reservation.release()
    assert not _claimed_elsewhere(port), f"expected port {port} free to reserve once released"


class _StartAt:
    """Stands in for random.SystemRandom: the search starts at a given port."""

    def __init__(self, port: int) -> None:
        self.offset = port - ports.PORT_AUTO_LO

    def randrange(self, span: int) -> int:
        return self.offset


def test_a_port_something_listens_on_is_never_chosen(monkeypatch):
    with ports.reserve(1) as first:
        port = first.ports[0]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        monkeypatch.setattr(ports.random, "SystemRandom", lambda: _StartAt(port))
        with ports.reserve(3) as more:
            assert port not in more.ports, f"expected {port}, which is listened on, to be skipped: {more.ports}"


def test_two_reservations_held_at_once_never_share_a_port():
    with ports.reserve(20) as a, ports.reserve(20) as b:
        assert not set(a.ports) & set(b.ports), (a.ports, b.ports)
