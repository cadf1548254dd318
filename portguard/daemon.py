"""``portguard run``: the composition of the parts that keep every configured rule healthy all day.

Workers, each supervised (restarted after a crash; the daemon exits 2 when one cannot be kept alive):
  * ``runner``: coalesced, rate-limited full syncs with a jittered periodic backstop (runner.py);
  * ``docker`` and ``runtimes`` (Podman, CNI, kube-proxy): the runtimes' inventory, from their sources
    (watch/docker.py, watch/runtimes.py): a changed part changes the rules and requests a sync;
  * ``nft-notify`` and ``poll``: kernel change sources, as the backend asks (watch/sources.py);
  * ``effects``: conntrack healing and the effect audit, never on the sync's path (effects.py);
  * ``metrics``: /metrics and /healthz, bounded (metrics.py).
The main thread waits for signals: SIGTERM/SIGINT stop (rules stay unless --cleanup-on-exit),
SIGHUP reloads the config (reload.py).  Health and systemd notification live in health.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import gc
import queue
import signal
import threading
import time
from collections.abc import Callable

from portguard import __version__
from portguard.audit import Scope
from portguard.backends import Backend, make_backend
from portguard.config import Config
from portguard.desired import desired_rules
from portguard.detect import select_backend
from portguard.effects import EffectWorker
from portguard.errors import FatalError, PortguardError, RetryableError, UnfixableError
from portguard.health import Health, StormMeter
from portguard.inventory import Inventory, Part
from portguard.logs import Logger
from portguard.metrics import Metrics, MetricsServer
from portguard.reconciler import Reconciler
from portguard.reload import Reloader
from portguard.runner import Schedule, SyncRunner
from portguard.runtime import RuntimeDir
from portguard.sdnotify import Notifier
from portguard.supervisor import Supervisor
from portguard.watch.docker import DockerWatcher
from portguard.watch.runtimes import runtime_sources
from portguard.watch.sources import change_sources

__all__ = ["Daemon", "run_daemon"]

_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_SHUTDOWN_WAIT = 60.0  # the sync in flight finishes before --cleanup-on-exit removes anything


def release_memory() -> None:
    """Hand start-up garbage (imports, backend probing) back to the kernel: a long-lived daemon's RSS
    should be what it uses, not its high-water mark (glibc keeps freed heap otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


M_ARENA_MAX = -8  # mallopt(3)


def limit_arenas(arenas: int = 2) -> None:
    """glibc gives each thread its own malloc arena (up to 8 per core) and keeps freed memory in each: for a
    daemon of eight mostly idle threads that is RSS for nothing.  Two arenas, set before any worker starts."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas)


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
        runtime: RuntimeDir | None = None,
    ) -> None:
        self.cfg = cfg
        self._log = log
        self.metrics = metrics or Metrics()
        self._cleanup = cleanup_on_exit
        self._runtime = runtime
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()  # one record written at a time, and always the latest inventory
        # What the last daemon here recorded stands until each source has reported (a restart keeps Docker's
        # networks covered while Docker is still being asked).
        self._inventory = (runtime.load_inventory() if runtime is not None else None) or Inventory()
        self._unfixable = ""  # the unfixable condition last logged: each change is logged once
        self._fatal: PortguardError | None = None
        self._docker_up = False
        self._installed = False  # the first complete write is an install, every later one a repair
        self._note = ""  # the backend's last note, logged once
        self.supervisor = Supervisor(log, on_restart=lambda name: self.metrics.worker_restarts.labels(name).inc())
        self.health = Health(notifier or Notifier(), reconcile_interval=cfg.daemon_reconcile_interval,
                             workers_alive=self.supervisor.alive)
        self.storm = StormMeter(cfg.daemon_storm_repairs, cfg.daemon_storm_window)
        # After each audit: give freed heap back (glibc keeps it per thread arena otherwise), so RSS stays what
        # the daemon uses, not the high-water mark of a burst of Docker events or reconnects.
        self.effects = EffectWorker(lambda: self.cfg, self.metrics, log, after_audit=release_memory,
                                    scope=lambda: Scope.of(self.cfg, self.reconciler.rules))
        self._reconciler = self._build(cfg)
        self.runner = SyncRunner(
            self._sync,
            Schedule(cfg.daemon_min_interval, cfg.daemon_reconcile_interval, cfg.daemon_max_backoff),
            heartbeat=self.health.beat,
            heartbeat_interval=self.health.heartbeat_interval,
        )
        self._reloads = runtime.reload_outcome()[0] if runtime is not None else 0
        self._reloader = Reloader(reload_config, self._adopt, self.health, log, on_outcome=self._record_reload)
        self._docker: DockerWatcher | None = None

    # ---- the rules: config, backend and Docker's inventory ----

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
        return Reconciler(backend, desired_rules(cfg, self._inventory, families), self._log,
                          conflicts=selection.conflicts)

    @property
    def reconciler(self) -> Reconciler:
        with self._lock:
            return self._reconciler

    def set_part(self, runtime: str, part: Part | None) -> None:
        """A runtime's source read its part (None: that runtime is not here): derive the rules, sync if they
        changed."""
        with self._lock:
            before = self._inventory
            self._inventory = before.with_part(runtime, part)
            if self._inventory == before:
                return
            reconciler = self._reconciler
            families = [f for f in self.cfg.families if f in reconciler.backend.families()]
            changed = reconciler.set_rules(desired_rules(self.cfg, self._inventory, families))
            inventory = self._inventory
        now = inventory.part(runtime)
        self._log.info("inventory.changed", runtime=runtime, networks=len(now.networks) if now else 0,
                       marks=[f"{v:#x}/{m:#x}" for v, m in now.marks] if now else [], rules=len(reconciler.rules))
        if self._runtime is not None:
            # Two sources may report at once: whichever writes last writes the inventory as it is then, never an
            # older one it computed before the other's part came in.
            with self._save_lock:
                with self._lock:
                    latest = self._inventory
                self._runtime.save_inventory(latest)
        if changed:
            self.runner.request()

    # ---- the one sync every trigger requests ----

    def _sync(self) -> bool:
        """One sync and what follows from it; True unless a retry (with backoff) is wanted."""
        reconciler = self.reconciler
        name = reconciler.backend.name
        started = time.perf_counter()
        try:
            report = reconciler.sync(installing=not self._installed)
        except UnfixableError as exc:
            # No write of portguard's can fix it: report each change once, no rewrites, no backoff.
            self.metrics.sync_failures.labels("unfixable").inc()
            self._report_unfixable(str(exc), name)
            self.health.synced(False, f"unfixable: {exc}", settled=True)
            return True
        except RetryableError as exc:
            self.metrics.sync_failures.labels("retry").inc()
            self._log.warning("sync.failed", error=str(exc), retry=True)
            self.health.synced(False, f"retrying: {exc}")
            return False
        except FatalError as exc:
            self.metrics.sync_failures.labels("fatal").inc()
            self._log.critical("sync.fatal", error=str(exc))
            self._fatal = exc  # the main thread exits 2 so systemd can act
            return False
        except Exception:  # noqa: BLE001  # a bug must cost one sync, never the runner
            self.metrics.sync_failures.labels("internal").inc()
            self._log.error("sync.crashed", exc_info=True)
            self.health.synced(False, "retrying after an internal error")
            return False
        after = report.after
        self._installed = self._installed or not after.needs_write
        self.metrics.observed(after, ok=after.healthy, seconds=time.perf_counter() - started, now=time.time())
        self._report_unfixable("; ".join(after.unfixable), name)
        if after.note and after.note != self._note:
            self._note = after.note
            self._log.warning("backend.note", backend=name, detail=after.note)
        if report.repaired:
            self.metrics.repaired(report.repaired)
            self._after_repair(report.repaired)
        total = len(after.statuses)
        if after.healthy:
            status = (f"healthy: {total} rules ({name}); docker "
                      f"{'connected' if self._docker_up else 'not connected'}")
        elif not after.needs_write:
            status = f"unfixable: {'; '.join(after.unfixable)[:200]} ({name})"
        else:
            bad = sum(1 for s in after.statuses if s.state.value != "healthy")
            status = f"unhealthy: {bad} of {total} rules ({name})"
        if self.health.synced(after.healthy, status, settled=not after.needs_write):
            release_memory()
        return not after.needs_write

    def _after_repair(self, repaired: tuple[tuple[str, object], ...]) -> None:
        if self.storm.repaired(time.monotonic()):
            self._log.error("rule.repair_storm", repairs=self.storm.count(time.monotonic()),
                            window_s=self.storm.window, rules=sorted({name for name, _ in repaired}),
                            hint="another program keeps removing or overriding portguard's rules; repairs go on "
                                 "at full speed")
        self.effects.request_heal()

    def _report_unfixable(self, what: str, backend: str) -> None:
        if what == self._unfixable:
            return
        if what:
            self._log.error("rule.unfixable", error=what, backend=backend)
        else:
            self._log.info("rule.unfixable_cleared", was=self._unfixable, backend=backend)
        self._unfixable = what

    def healthy(self) -> bool:
        return self.health.healthy()

    def _record_reload(self, ok: bool, detail: str) -> None:
        self._reloads += 1
        if self._runtime is not None:
            self._runtime.record_reload(self._reloads, ok, detail)

    # ---- workers ----

    def _docker_worker(self, cfg: Config) -> Callable[[threading.Event], None]:
        watcher = DockerWatcher(
            lambda _why: self.runner.request(),
            self.runner.request_in,
            self._log,
            docker_host=cfg.docker_host,
            max_backoff=cfg.daemon_max_backoff,
            on_connection=self._set_docker,
            on_part=self.set_part,
        )
        self._docker = watcher
        return watcher.run

    def _set_docker(self, up: bool) -> None:
        self._docker_up = up
        self.metrics.docker_connected.set(1 if up else 0)

    def _start_workers(self) -> None:
        sup = self.supervisor
        runtimes = runtime_sources(lambda: self.cfg, self.set_part)
        runtimes.poll()  # before the first sync: READY=1 comes with the local runtimes' rules in force
        metrics = None
        if self.cfg.metrics_listen:
            # Bound before the first sync can send READY=1: ready means the endpoint answers.
            metrics = MetricsServer(self.metrics, self.cfg.metrics_listen, self.healthy, self._log)
            metrics.bind()
        # Subscribed before the first sync: a change made between that sync and a later subscription would go
        # unnoticed until the backstop, and READY=1 means that changes are watched.
        sources = change_sources(lambda: self.reconciler.backend.watch, lambda _why: self.runner.request(),
                                 self._log, poll_interval=lambda: self.cfg.daemon_poll_interval,
                                 on_malformed=self.metrics.malformed.inc)
        sources["runtimes"] = runtimes.run
        sup.start("runner", self.runner.loop)
        sup.start("docker", self._docker_worker(self.cfg))
        for name, work in sources.items():
            sup.start(name, work)
        sup.start("effects", self.effects.run)
        if metrics is not None:
            sup.start("metrics", metrics.run)

    # ---- life cycle ----

    def _adopt(self, cfg: Config) -> None:
        """A new config (SIGHUP): everything is built before anything is switched."""
        previous = self.reconciler.backend
        reconciler = self._build(cfg, current=previous)
        old = self.cfg
        with self._lock:
            self.cfg = cfg
            self._reconciler = reconciler
        if reconciler.backend is not previous:
            previous.close()  # another backend now: release the old one's owned table (its standby stays)
        self.runner.configure(cfg.daemon_min_interval, cfg.daemon_reconcile_interval, cfg.daemon_max_backoff)
        self.storm = StormMeter(cfg.daemon_storm_repairs, cfg.daemon_storm_window)
        self.health.reconcile_interval = cfg.daemon_reconcile_interval
        if cfg.docker_host != old.docker_host:
            if self._docker is not None:
                self._docker.stop()
            self.supervisor.restart("docker", self._docker_worker(cfg))
        self.runner.request()

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)  # threads started below inherit the mask
        self._log.info("daemon.started", version=__version__, backend=self.reconciler.backend.name,
                       rules=len(self.reconciler.rules), config=self.cfg.source)
        self._start_workers()
        # Handlers, not sigtimedwait: CPython 3.11's sigtimedwait handed back a siginfo it never filled after
        # SIGSTOP/SIGCONT, which once read as SIGHUP (a reload nobody asked for).  SimpleQueue.put is reentrant.
        received: queue.SimpleQueue[int] = queue.SimpleQueue()
        for sig in _SIGNALS:
            signal.signal(sig, lambda signo, _frame: received.put(signo))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # this thread alone takes them
        exit_code = 0
        try:
            while True:
                try:
                    signo: int | None = received.get(timeout=0.25)
                except queue.Empty:
                    signo = None
                if self._fatal is not None or self.supervisor.failed.is_set():
                    exit_code = 2
                    break
                if signo is None:
                    continue
                if signo == signal.SIGHUP:
                    self._log.info("daemon.reload_requested")
                    self._reloader.reload(self.cfg)
                    continue
                self._log.info("daemon.stopping", signal=signal.Signals(signo).name, cleanup=self._cleanup)
                break
        finally:
            self._shutdown()
        self._log.info("daemon.stopped", exit_code=exit_code)
        return exit_code

    def _shutdown(self) -> None:
        self.health.stopping()
        self.supervisor.stopping.set()
        self.runner.stop()
        if self._docker is not None:
            self._docker.stop()
        self.supervisor.stop(timeout=_SHUTDOWN_WAIT)  # the runner's sync in flight ends first
        if self._cleanup:
            with contextlib.suppress(PortguardError):
                self.reconciler.remove()
        # Closing the libnftables context ends the table's ownership; the kernel deletes the owned table
        # and the standby keeps the rules in force until the next start (unless cleaned up above).
        self.reconciler.backend.close()


def run_daemon(
    cfg: Config, log: Logger, *, cleanup_on_exit: bool = False, reload_config: Callable[[], Config] | None = None
) -> int:
    limit_arenas()
    # SIGUSR1: every thread's stack to stderr (the journal), from the C level, however busy or stuck the
    # interpreter is; nothing else happens.  For a worker that seems to hang.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    runtime = RuntimeDir()
    runtime.lock()
    try:
        daemon = Daemon(cfg, log, reload_config=reload_config or (lambda: cfg), cleanup_on_exit=cleanup_on_exit,
                        runtime=runtime)
        return daemon.run()
    finally:
        runtime.unlock()
