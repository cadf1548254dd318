"""The parts of `portguard run`, each alone with an injected clock: supervision, health and systemd
notification, storm accounting, the effect worker, reload, and the Docker inventory."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from portguard.config import Config
from portguard.conntrack import ConntrackError
from portguard.effects import EffectWorker, Result
from portguard.errors import ConfigError
from portguard.health import Health, StormMeter
from portguard.metrics import Metrics
from portguard.reload import Reloader
from portguard.runtimes.docker import parse_networks
from portguard.supervisor import Flag, RestartPolicy, Stop, Supervisor, wait_readable
from portguard.watch.docker import DockerWatcher

LOG = structlog.get_logger("test")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Notes:
    """A Notifier that records what it was told."""

    def __init__(self, watchdog: float | None = None) -> None:
        self.sent: list[str] = []
        self.watchdog_interval = watchdog

    def send(self, *fields: str) -> None:
        self.sent.extend(fields)


def test_restart_policy_backs_off_and_gives_up_after_too_many_crashes_in_the_window() -> None:
    """Delays double from the first; the sixth crash within a minute gives up; old crashes are forgotten."""
    policy = RestartPolicy(max_crashes=5, window=60, first_delay=0.1, max_delay=1.0)
    assert [policy.crashed(t) for t in range(5)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert policy.crashed(5) is None
    fresh = RestartPolicy(max_crashes=2, window=10)
    assert fresh.crashed(0) is not None and fresh.crashed(1) is not None and fresh.crashed(100) is not None


def test_supervisor_restarts_a_crashing_worker_and_counts_it() -> None:
    """A worker that raises twice, then runs, is restarted twice and keeps running; restarts are counted."""
    restarts: list[str] = []
    runs: list[int] = []
    running = threading.Event()

    def flaky(stop: threading.Event) -> None:
        runs.append(1)
        if len(runs) <= 2:
            raise RuntimeError("bug")
        running.set()
        stop.wait()

    sup = Supervisor(LOG, on_restart=restarts.append, policy=lambda: RestartPolicy(first_delay=0.01))
    sup.start("flaky", flaky)
    assert running.wait(5)
    assert restarts == ["flaky", "flaky"] and sup.alive() and not sup.failed.is_set()
    sup.stop()


def test_a_worker_waiting_on_its_files_sleeps_until_one_is_readable_or_it_is_stopped() -> None:
    """wait_readable with the supervisor's Stop (selected on with the files, so a blocked worker needs no timeout
    slices): True when a file becomes readable, False when the supervisor stops it; the Stop is closed after."""
    a, b = socket.socketpair()
    results: list[bool] = []
    stops: list[Stop] = []
    waiting = threading.Event()

    def worker(stop: threading.Event) -> None:
        assert isinstance(stop, Stop)
        stops.append(stop)
        waiting.set()
        results.append(wait_readable(stop, a))  # b sends: readable
        a.recv(1)
        results.append(wait_readable(stop, a))  # the supervisor stops it
        stop.wait()

    sup = Supervisor(LOG)
    sup.start("w", worker)
    assert waiting.wait(5)
    b.send(b"x")
    assert _wait_until(lambda: len(results) == 1)
    sup.stop()
    assert results == [True, False] and not sup.alive()
    assert stops[0].fileno() == -1  # its socket pair closed with the worker
    assert wait_readable(threading.Event(), a, timeout=0.05) is False  # a plain Event: the timeout holds
    a.close()
    b.close()


def test_a_flag_is_readable_from_set_until_clear_however_often_it_was_set() -> None:
    """A Flag (the effect worker's heal request) is readable once set, however often, and clear() drains it: the
    next wait runs into its timeout."""
    flag = Flag()
    stop = Stop()
    assert wait_readable(stop, flag, timeout=0.05) is False
    for _ in range(3):
        flag.set()
    assert wait_readable(stop, flag, timeout=5) is True  # readable: a timeout would answer False
    flag.clear()
    assert not flag.is_set() and wait_readable(stop, flag, timeout=0.1) is False
    flag.close()
    stop.close()


def test_waiting_for_docker_ends_when_its_socket_appears_or_on_stop_not_at_the_end_of_the_backoff(
        tmp_path: Path) -> None:
    """While dockerd is away the watcher waits out its backoff asleep on the socket's directory: the socket being
    created ends the wait (a minute's backoff is not waited out), and so does the stop request."""
    sock = tmp_path / "docker.sock"
    stop = Stop()
    watcher = DockerWatcher(lambda _why: None, lambda *_a: None, LOG, docker_host=f"unix://{sock}")
    watcher._stop = stop  # as run() takes the supervisor's
    waiter = threading.Thread(target=watcher._wait_for_engine, args=(60.0,))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))  # dockerd is back
    waiter.join(10)
    assert not waiter.is_alive()
    waiter = threading.Thread(target=watcher._wait_for_engine, args=(60.0,))
    waiter.start()
    time.sleep(0.2)
    stop.set()
    waiter.join(10)
    assert not waiter.is_alive()
    listener.close()
    stop.close()


def _wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_supervisor_sets_failed_when_a_worker_cannot_be_kept_alive() -> None:
    """A worker that always crashes exhausts the policy: failed is set (the daemon then exits 2)."""
    def broken(stop: threading.Event) -> None:
        raise RuntimeError("always")

    sup = Supervisor(LOG, policy=lambda: RestartPolicy(max_crashes=2, first_delay=0.001))
    sup.start("broken", broken)
    assert sup.failed.wait(5) and sup.failed_worker == "broken" and not sup.alive()
    sup.stop()


def test_health_ready_once_status_on_change_and_watchdog_at_its_interval() -> None:
    """READY=1 after the first healthy sync only; STATUS= when it changes; WATCHDOG=1 no more often than 0.9 x."""
    clock, notes = Clock(), Notes(watchdog=10.0)
    health = Health(notes, reconcile_interval=30, clock=clock)  # type: ignore[arg-type]
    assert not health.synced(False, "unhealthy") and "READY=1" not in notes.sent
    assert health.synced(True, "healthy") and notes.sent.count("READY=1") == 1
    sent = len(notes.sent)
    assert not health.synced(True, "healthy") and len(notes.sent) == sent  # nothing new: no datagram
    health.beat()
    clock.now += 5
    health.beat()
    clock.now += 4
    health.beat()
    assert notes.sent.count("WATCHDOG=1") == 2


def test_ready_once_settled_even_when_something_unfixable_remains() -> None:
    """READY=1 when everything fixable is done, though a foreign condition keeps the rules unhealthy (systemd
    would otherwise kill a daemon that does all it can); /healthz stays false."""
    notes = Notes()
    health = Health(notes, reconcile_interval=30)  # type: ignore[arg-type]
    assert not health.synced(False, "unhealthy: 2 of 10", settled=False)
    assert health.synced(False, "unfixable: shadowed", settled=True) and "READY=1" in notes.sent
    assert not health.healthy()


def test_healthz_needs_a_beating_loop_a_recent_healthy_sync_and_live_workers() -> None:
    """/healthz: false before the first sync, true after a healthy one, false when the loop stops beating, when the
    last healthy sync is too old, or when a worker is down."""
    clock, alive = Clock(), [True]
    health = Health(Notes(), reconcile_interval=30, workers_alive=lambda: alive[0], clock=clock)  # type: ignore[arg-type]
    assert not health.healthy()
    health.synced(True, "ok")
    assert health.healthy()
    alive[0] = False
    assert not health.healthy()
    alive[0] = True
    clock.now += 11  # no beat for longer than max(10, 2 x heartbeat)
    assert not health.healthy()
    health.beat()
    assert health.healthy()
    clock.now += 2 * 30 + 31
    health.beat()
    assert not health.healthy()


def test_reloading_is_announced_with_monotonic_usec_and_ready_follows() -> None:
    """sd_notify(3) reload protocol: RELOADING=1 with MONOTONIC_USEC, then READY=1."""
    notes = Notes()
    health = Health(notes, reconcile_interval=30)  # type: ignore[arg-type]
    new = Config(to_ports=Config().to_ports)
    adopted: list[Config] = []
    reloader = Reloader(lambda: new, adopted.append, health, LOG, monotonic_usec=lambda: 42)
    assert reloader.reload(Config()) is new and adopted == [new]
    assert notes.sent[:2] == ["RELOADING=1", "MONOTONIC_USEC=42"] and notes.sent[-2] == "READY=1"


def test_a_failed_reload_keeps_the_old_config_whatever_the_error() -> None:
    """A config error, a bug in adopting, anything: None (the old config stays), and READY=1 still follows."""
    notes = Notes()
    health = Health(notes, reconcile_interval=30)  # type: ignore[arg-type]

    def bad_load() -> Config:
        raise ConfigError("config x: not valid UTF-8 (byte 3)")

    def bad_adopt(_cfg: Config) -> None:
        raise ValueError("Exceeds the limit (4300 digits)")

    assert Reloader(bad_load, lambda _c: None, health, LOG).reload(Config()) is None
    assert Reloader(Config, bad_adopt, health, LOG).reload(Config()) is None
    assert notes.sent.count("READY=1") == 2


def test_storm_meter_reports_a_fight_once_per_window() -> None:
    """Five repairs within the window is a fight, reported once; repairs that age out no longer count."""
    storm = StormMeter(repairs=5, window=30)
    assert [storm.repaired(float(t)) for t in range(6)] == [False] * 4 + [True, False]
    assert storm.count(100.0) == 0


def test_effect_worker_coalesces_heal_requests_and_survives_conntrack_failures() -> None:
    """Many repairs while a heal runs give one more heal; a failing conntrack is logged, counted, never raised."""
    calls: list[str] = []
    started, release = threading.Event(), threading.Event()

    def heal(_cfg: Config) -> Result:
        calls.append("heal")
        started.set()
        release.wait(5)
        if len(calls) == 2:
            raise ConntrackError("conntrack -L did not finish within 20 s (killed)")
        return Result(3, via="ctnetlink", malformed=2)

    metrics = Metrics()
    worker = EffectWorker(lambda: Config(daemon_audit_interval=3600), metrics, LOG, heal=heal,
                          audit=lambda _c, _s: Result(0), bypasses=lambda _c: [])
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    worker.request_heal()
    assert started.wait(5)
    for _ in range(10):
        worker.request_heal()  # while the first heal runs
    release.set()
    threading.Event().wait(1.2)
    stop.set()
    thread.join(5)
    assert calls == ["heal", "heal"]
    sample = metrics.registry.get_sample_value
    assert sample("portguard_conntrack_healed_total") == 3
    assert sample("portguard_conntrack_malformed_total") == 2  # skipped messages are counted, the worker goes on
    assert sample("portguard_sync_failures_total", {"kind": "conntrack"}) == 1


def test_inventory_keeps_bridge_networks_that_can_reach_out_and_reads_their_nat_options() -> None:
    """Bridge networks with subnets are kept (internal and other drivers not); options decide the translation."""
    raw: list[dict[str, Any]] = [
        {"Name": "bridge", "Id": "a" * 64, "Driver": "bridge", "Options": {}, "IPAM": {"Config": [
            {"Subnet": "172.17.0.0/16"}]}},
        {"Name": "snat", "Id": "b" * 64, "Driver": "bridge", "Options": {
            "com.docker.network.host_ipv4": "198.51.100.32"}, "IPAM": {"Config": [{"Subnet": "10.76.0.1/24"},
                                                                                   {"Subnet": "fd00:1::/64"}]}},
        {"Name": "plain", "Id": "c" * 64, "Driver": "bridge", "Options": {
            "com.docker.network.bridge.enable_ip_masquerade": "false",
            "com.docker.network.bridge.name": "mybr0"}, "IPAM": {"Config": [{"Subnet": "10.77.0.0/24"}]}},
        {"Name": "hidden", "Id": "d" * 64, "Driver": "bridge", "Internal": True, "IPAM": {"Config": [
            {"Subnet": "10.78.0.0/24"}]}},
        {"Name": "mac", "Id": "e" * 64, "Driver": "macvlan", "IPAM": {"Config": [{"Subnet": "10.79.0.0/24"}]}},
        {"Name": "bad", "Id": "f" * 64, "Driver": "bridge", "Options": {"com.docker.network.host_ipv4": "nope"},
         "IPAM": {"Config": [{"Subnet": "not a subnet"}]}},
    ]
    nets = {n.name: n for n in parse_networks(raw)}
    assert set(nets) == {"bridge", "snat", "plain"}
    assert nets["bridge"].bridge == "docker0" and nets["bridge"].masquerade
    assert nets["snat"].subnets == ("10.76.0.0/24", "fd00:1::/64") and nets["snat"].host_ipv4 == "198.51.100.32"
    assert nets["snat"].bridge == "br-" + "b" * 12
    assert not nets["plain"].masquerade and nets["plain"].bridge == "mybr0"
