"""``portguard run``: the event loop that keeps every configured rule healthy all day.

Threads, each only *requesting* a sync from the one runner:
  * the runner: coalesced, rate-limited full syncs with a jittered periodic backstop;
  * the Docker watcher: network and daemon events, reconnect after the stream ends;
  * the kernel watcher: nf_tables change notifications, or a cheap legacy fingerprint poll.
The main thread waits for signals: SIGTERM/SIGINT stop (rules stay unless --cleanup-on-exit),
SIGHUP reloads the config (an invalid one is logged and the old one stays in force).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import gc
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from portguard import __version__
from portguard.audit import audit
from portguard.backends import Backend, make_backend
from portguard.config import Config
from portguard.conntrack import heal, list_flows
from portguard.desired import desired_rules, skipped_networks
from portguard.detect import select_backend
from portguard.errors import ConfigError, FatalError, PortguardError, RetryableError, UnfixableError
from portguard.logs import Logger
from portguard.metrics import Metrics, serve
from portguard.networks import DockerNetwork
from portguard.reconciler import Reconciler
from portguard.runner import Schedule, SyncRunner
from portguard.sdnotify import Notifier
from portguard.watch.docker import DockerWatcher
from portguard.watch.kernel import LegacyFingerprint, NftablesNotifications

__all__ = ["Daemon", "run_daemon"]

_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def release_memory() -> None:
    """Hand start-up garbage (imports, backend probing) back to the kernel: a long-lived daemon's RSS
    should be what it uses, not its high-water mark (glibc keeps freed heap otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def instance_lock() -> socket.socket:
    """Abstract unix sockets live in the network namespace: one bound name = one daemon per namespace."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("\0portguard.run")
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise FatalError("another 'portguard run' is already active in this network namespace") from None
        raise
    return sock


class Daemon:
    def __init__(
        self,
        cfg: Config,
        log: Logger,
        *,
        reload_config: Callable[[], Config],
        cleanup_on_exit: bool = False,
        notifier: Notifier | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.cfg = cfg
        self._log = log
        self.metrics = metrics or Metrics()
        self._reload_config = reload_config
        self._cleanup = cleanup_on_exit
        self._notify = notifier or Notifier()
        self._lock = threading.Lock()
        self._networks: tuple[DockerNetwork, ...] = ()
        self._unfixable = ""  # the last unfixable condition logged, so each change is logged once
        self._reconciler = self._build(cfg)
        self._fatal: PortguardError | None = None
        self._ready = False
        self._docker_up = False
        self._repairs: collections.deque[float] = collections.deque()
        self._storm_logged_at = float("-inf")
        self._last_watchdog = 0.0
        self._last_beat = time.monotonic()
        self._last_ok: float | None = None  # monotonic time of the last sync that ended healthy
        self._last_healthy = False  # did the last sync end healthy
        self._status = "starting"
        self._audit_count = 0
        self.runner_heartbeat = min(5.0, self._notify.watchdog_interval or 5.0)
        self.runner = SyncRunner(
            self._sync,
            Schedule(cfg.daemon_min_interval, cfg.daemon_reconcile_interval, cfg.daemon_max_backoff),
            heartbeat=self._heartbeat,
            heartbeat_interval=self.runner_heartbeat,
        )

    def _build(self, cfg: Config, current: Backend | None = None) -> Reconciler:
        selection = select_backend(cfg.backend, docker_host=cfg.docker_host,
                                   factory=lambda name: make_backend(name, owner=True))
        backend = selection.backend
        if current is not None and current.name == backend.name:
            # Same backend after a reload: keep the object, its libnftables context owns the table.
            backend.close()
            backend = current
        for why in selection.skipped:
            self._log.info("backend.skipped", reason=why)
        for conflict in selection.conflicts:
            self._log.warning("backend.conflict", detail=conflict)
        self._log.info("backend.selected", backend=backend.name, reason=selection.reason)
        self.metrics.set_backend(backend.name)
        families = [f for f in cfg.families if f in backend.families()]
        for missing in (f for f in cfg.families if f not in families):
            self._log.warning("family.unavailable", family=missing.value, backend=backend.name,
                              detail="this host cannot translate it with this backend; other families stay enforced")
        rules = desired_rules(cfg, self._networks, families)
        return Reconciler(backend, rules, self._log, conflicts=selection.conflicts)

    def _families(self, reconciler: Reconciler) -> list[Any]:
        return sorted({r.family for r in reconciler.rules})

    def set_networks(self, networks: tuple[DockerNetwork, ...]) -> None:
        """Docker's inventory changed (or was read again): derive the rules; the caller requests the sync."""
        with self._lock:
            self._networks = networks
            reconciler = self._reconciler
            families = [f for f in self.cfg.families if f in reconciler.backend.families()]
            changed = reconciler.set_rules(desired_rules(self.cfg, networks, families))
        if changed:
            self._log.info("docker.networks", networks=len(networks), rules=len(reconciler.rules),
                           skipped=skipped_networks(networks))

    @property
    def reconciler(self) -> Reconciler:
        with self._lock:
            return self._reconciler

    # ---- the one sync every trigger requests ----

    def _sync(self) -> bool:
        reconciler = self.reconciler
        started = time.perf_counter()
        try:
            report = reconciler.sync()
        except UnfixableError as exc:
            # No write of portguard's can fix it: report each change once, keep going at full speed, no backoff.
            self._last_healthy = False
            self._report_unfixable(str(exc), reconciler.backend.name)
            self._set_status(f"unfixable: {exc}")
            return True
        except RetryableError as exc:
            self._log.warning("sync.failed", error=str(exc), retry=True)
            self._set_status(f"retrying: {exc}")
            return False
        except FatalError as exc:
            self._log.critical("sync.fatal", error=str(exc))
            self._fatal = exc  # the main thread exits 2 so systemd can act
            return False
        except Exception:  # noqa: BLE001  # a bug must cost one sync, never the runner thread
            self._log.error("sync.crashed", exc_info=True)
            self._set_status("retrying after an internal error")
            return False
        healthy = report.after.healthy
        self._last_healthy = healthy
        self._report_unfixable("; ".join(report.after.unfixable), reconciler.backend.name)
        self.metrics.observed(report.after, ok=healthy, seconds=time.perf_counter() - started, now=time.time())
        if healthy:
            self._last_ok = time.monotonic()
        if report.repaired:
            self.metrics.repaired(report.repaired)
            self._after_repair(report.repaired)
        elif self._repairs:
            self._storming(time.monotonic())
        total = len(report.after.statuses)
        if healthy:
            self._set_status(
                f"healthy: {total} rules ({reconciler.backend.name}); docker "
                f"{'connected' if self._docker_up else 'not connected'}"
            )
            if not self._ready:
                self._ready = True
                self._notify.send("READY=1", f"STATUS={self._status}")
                release_memory()
        else:
            bad = sum(1 for s in report.after.statuses if s.state.value != "healthy")
            self._set_status(f"unhealthy: {bad} of {total} rules ({reconciler.backend.name})")
        return healthy

    def _report_unfixable(self, what: str, backend: str) -> None:
        """Log an unfixable condition once per change (and its end), never once per sync."""
        if what == self._unfixable:
            return
        if what:
            self._log.error("rule.unfixable", error=what, backend=backend)
        else:
            self._log.info("rule.unfixable_cleared", was=self._unfixable, backend=backend)
        self._unfixable = what

    def _storming(self, now: float) -> bool:
        """Forget repairs older than the window; are there still enough for a fight?  A fight is reported,
        never answered by slowing down: a delayed repair is a gap every new connection falls into."""
        while self._repairs and self._repairs[0] < now - self.cfg.daemon_storm_window:
            self._repairs.popleft()
        return len(self._repairs) >= self.cfg.daemon_storm_repairs

    def _after_repair(self, repaired: tuple[tuple[str, Any], ...]) -> None:
        now = time.monotonic()
        window = self.cfg.daemon_storm_window
        self._repairs.append(now)
        if self._storming(now) and now - self._storm_logged_at >= window:
            self._storm_logged_at = now
            self._log.error(
                "rule.repair_storm",
                repairs=len(self._repairs),
                window_s=window,
                rules=sorted({name for name, _ in repaired}),
                hint="another program keeps removing or overriding portguard's rules",
            )
        if self.cfg.daemon_conntrack_heal:
            try:
                cleared = heal(self.cfg.families, self.cfg.protocols, self.cfg.source_ports, self.cfg.to_ports)
            except (OSError, TimeoutError) as exc:
                self._log.warning("conntrack.heal_failed", error=str(exc))
                return
            if cleared:
                self.metrics.conntrack_healed.inc(cleared)
                self._log.info("conntrack.healed", entries=cleared)

    def _set_status(self, status: str) -> None:
        if status != self._status:
            self._status = status
            self._notify.send(f"STATUS={status}")

    def _heartbeat(self) -> None:
        interval = self._notify.watchdog_interval
        now = time.monotonic()
        self._last_beat = now
        if interval is not None and now - self._last_watchdog >= interval * 0.9:
            self._last_watchdog = now
            self._notify.send("WATCHDOG=1")

    def _set_docker(self, up: bool) -> None:
        self._docker_up = up
        self.metrics.docker_connected.set(1 if up else 0)

    def healthy(self) -> bool:
        """For /healthz: the loop is alive and the last sync ended healthy, recently."""
        now = time.monotonic()
        alive = now - self._last_beat <= max(10.0, 2 * self.runner_heartbeat)
        recent = self._last_ok is not None and now - self._last_ok <= 2 * self.cfg.daemon_reconcile_interval + 30
        return alive and recent and self._last_healthy

    def _audit_loop(self, stop: threading.Event) -> None:
        """The effect audit: flows that left with a matched but untranslated port."""
        while not stop.wait(self.cfg.daemon_audit_interval):
            self.audit_once()
            release_memory()

    def audit_once(self) -> int:
        cfg = self.cfg
        try:
            flows = audit(list_flows(cfg.families, cfg.protocols), source=cfg.source_ports, target=cfg.to_ports,
                          interfaces=cfg.egress_interfaces, excluded=cfg.egress_exclude_interfaces)
        except (OSError, TimeoutError) as exc:
            self._log.warning("audit.failed", error=str(exc))
            return self._audit_count
        self.metrics.untranslated.set(len(flows))
        if len(flows) != self._audit_count and flows:
            self._log.warning("audit.untranslated", flows=len(flows),
                              first=[f"{f.protocol} {f.src}:{f.sport} -> {f.dst}:{f.dport}" for f in flows[:3]])
        self._audit_count = len(flows)
        return len(flows)

    # ---- triggers ----

    def _watched_tables(self) -> frozenset[bytes] | None:
        """Tables whose rule changes can matter, as the backend says (table and chain changes always do)."""
        return self.reconciler.backend.watch.nf_tables

    def _kernel_watcher(self) -> Callable[[], None]:
        """Start the change sources: nf_tables notifications where the kernel has them, and a poll that
        covers legacy tables (which notify nobody) or a host without notifications.  Both look at the
        current backend on every event, so a SIGHUP that changes the backend needs no restart."""
        stop = threading.Event()
        notifications: NftablesNotifications | None = None
        try:
            notifications = NftablesNotifications(lambda _why: self.runner.request(), self._log,
                                                  self._watched_tables)
        except OSError as exc:
            self._log.warning("kernel.notifications_unavailable", error=str(exc), fallback="poll")
        else:
            threading.Thread(target=notifications.run, name="nft-notify", daemon=True).start()
        threading.Thread(target=self._poll, args=(stop, notifications is not None), name="poll", daemon=True).start()

        def stop_all() -> None:
            stop.set()
            if notifications is not None:
                notifications.stop()

        return stop_all

    def _poll(self, stop: threading.Event, notified: bool) -> None:
        """Legacy tables send no notifications: compare a cheap fingerprint every poll interval."""
        prints = [LegacyFingerprint(False), LegacyFingerprint(True)]
        last: list[tuple[int, ...] | None] = [None, None]
        while not stop.wait(self.cfg.daemon_poll_interval):
            if self.reconciler.backend.watch.poll_legacy:
                now = [p.read() for p in prints]
                if now != last:
                    last = now
                    self.runner.request()
            elif not notified:
                self.runner.request()

    # ---- life cycle ----

    def _reload(self) -> None:
        try:
            cfg = self._reload_config()
            reconciler = self._build(cfg, current=self.reconciler.backend)
        except (ConfigError, FatalError) as exc:
            self._log.error("config.reload_failed", error=str(exc), kept=self.cfg.source)
            return
        with self._lock:
            self.cfg = cfg
            self._reconciler = reconciler
        self.runner.configure(cfg.daemon_min_interval, cfg.daemon_reconcile_interval, cfg.daemon_max_backoff)
        self._log.info("config.reloaded", source=cfg.source, rules=len(reconciler.rules))
        self.runner.request()

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)  # threads started below inherit the mask
        self._log.info(
            "daemon.started",
            version=__version__,
            backend=self.reconciler.backend.name,
            rules=len(self.reconciler.rules),
            config=self.cfg.source,
        )
        runner_thread = threading.Thread(target=self.runner.loop, name="runner", daemon=True)
        runner_thread.start()
        docker = DockerWatcher(
            lambda _why: self.runner.request(),
            self.runner.request_in,
            self._log,
            docker_host=self.cfg.docker_host,
            max_backoff=self.cfg.daemon_max_backoff,
            on_connection=self._set_docker,
            on_networks=self.set_networks,
        )
        threading.Thread(target=docker.run, name="docker", daemon=True).start()
        stop_kernel = self._kernel_watcher()
        stop_audit = threading.Event()
        threading.Thread(target=self._audit_loop, args=(stop_audit,), name="audit", daemon=True).start()
        server = serve(self.metrics, self.cfg.metrics_listen, self.healthy) if self.cfg.metrics_listen else None
        exit_code = 0
        try:
            while True:
                info = signal.sigtimedwait(_SIGNALS, 0.25)
                if self._fatal is not None:
                    exit_code = 2
                    break
                # CPython may hand back a struct it never filled when the wait is interrupted
                # (seen after SIGSTOP/SIGCONT); only a signal we asked for counts.
                if info is None or info.si_signo not in _SIGNALS:
                    continue
                if info.si_signo == signal.SIGHUP:
                    self._log.info("daemon.reload_requested")
                    self._reload()
                    continue
                self._log.info("daemon.stopping", signal=signal.Signals(info.si_signo).name, cleanup=self._cleanup)
                break
        finally:
            self._notify.send("STOPPING=1")
            self.runner.stop()
            stop_audit.set()
            docker.stop()
            if server is not None:
                server.shutdown()
            stop_kernel()
            # The sync in flight finishes first: a write landing after the cleanup would put the rules back.
            runner_thread.join(60.0)
            if self._cleanup:
                with contextlib.suppress(PortguardError):
                    self.reconciler.remove()
            # Closing the libnftables context ends the table's ownership; the kernel deletes the owned table
            # and the standby keeps the rules in force until the next start (unless cleaned up above).
            self.reconciler.backend.close()
        self._log.info("daemon.stopped", exit_code=exit_code)
        return exit_code


def run_daemon(
    cfg: Config, log: Logger, *, cleanup_on_exit: bool = False, reload_config: Callable[[], Config] | None = None
) -> int:
    with instance_lock():
        daemon = Daemon(cfg, log, reload_config=reload_config or (lambda: cfg), cleanup_on_exit=cleanup_on_exit)
        return daemon.run()
