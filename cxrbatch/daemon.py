"""`cxrbatch watch` and `cxrbatch worker`: the long-running service, wired in one place.

    watch:  ingest loop (this process: export folder and/or DICOM receiver)
            + sender thread (deliveries to [[send.destinations]], when configured)
            + N worker processes (models loaded once each; each with
              processing.study_threads studies in hand on threads sharing them)
    worker: N worker processes only (extra hosts sharing one PostgreSQL queue and storage)

SIGTERM or SIGINT drains: ingest stops taking files (the receiver stops listening),
every worker finishes the studies in hand within `jobs.drain_grace_seconds` or gives
them back to the queue, then exits. A worker process that dies (killed, out of memory) is
replaced; its job is recovered from the queue and counted as a failed attempt.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

from cxrbatch.cpus import threads_per_worker
from cxrbatch.db import jobs
from cxrbatch.db.session import ensure_local_sqlite, upgrade
from cxrbatch.errors import one_line
from cxrbatch.ingest.folder import FolderIngest
from cxrbatch.ingest.scp import DicomReceiver
from cxrbatch.ingest.spool import Spool
from cxrbatch.metrics import write_textfile
from cxrbatch.models.preflight import check_model_files
from cxrbatch.paths import (
    check_outside_input,
)
from cxrbatch.retention import cleanup
from cxrbatch.send.sender import SenderThread
from cxrbatch.site import Site
from cxrbatch.worker_entry import EXIT_CANNOT_START, worker_process_main

log = logging.getLogger(__name__)

_INGEST_TICK_SECONDS = 0.5


class Service:
    """Worker processes (and the folder ingest and DICOM receiver when configured) until a
    stop is requested."""

    def __init__(self, site: Site, workers: int, input_dir: Path | None = None) -> None:
        self.site = site
        self.settings = settings = site.settings
        self.workers = workers
        self.input_dir = input_dir
        self.stop_requested = threading.Event()
        # The models' files first: nothing is received or taken for workers that cannot
        # start (a missing checkpoint or bundle is one line and exit 2).
        check_model_files(settings)
        if input_dir is not None:
            check_outside_input(settings, input_dir, site.out_dir)
        site.out_dir.mkdir(parents=True, exist_ok=True)
        ensure_local_sqlite(site.database_url)
        upgrade(site.database_url, roots=site.roots)
        self.database = site.database()
        self.sessions = self.database.sessions
        self._context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._children: list[BaseProcess] = []
        self._started_at: dict[int, float] = {}
        self._quick_deaths = 0
        self._respawn_after = 0.0
        self._retention_due: float | None = None
        self._metrics_due = 0.0
        # 0, or 2 when the service stopped because its workers cannot start.
        self.exit_code = 0

    # -- signals --------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: draining", signal.Signals(signum).name)
        self.stop_requested.set()
        # The workers stop claiming now, not after this loop's tick and the ingest's
        # shutdown: a fast worker would otherwise start new studies after the signal.
        self._signal_workers()

    # -- running --------------------------------------------------------------------------

    def run(self) -> None:
        policy = jobs.RetryPolicy.from_settings(self.settings.queue)
        recovered = jobs.recover_stalled(self.sessions, policy)
        if recovered:
            log.warning("%d job(s) of a previous run recovered for retry", recovered)
        ingest = self._start_ingest() if self.input_dir is not None else None
        receiver = self._start_receiver() if self.settings.dicom.listen else None
        sender = None
        if self.settings.send.destinations:
            sender = SenderThread(self.settings, self.sessions, self.site.roots)
            sender.start()
        web = self._start_web() if self.settings.web.with_watch else None
        try:
            for _ in range(self.workers):
                self._spawn_worker()
            while not self.stop_requested.is_set():
                if ingest is not None:
                    ingest.step()
                self._replace_dead_workers()
                self._retention_if_due()
                self._metrics_if_due()
                self.stop_requested.wait(_INGEST_TICK_SECONDS)
        finally:
            if receiver is not None:
                receiver.stop()
            if ingest is not None:
                ingest.stop()
            self._drain()
            if sender is not None:
                sender.stop()  # unsent deliveries stay queued for the next start
            if web is not None:
                web.should_exit = True
            self.database.close()

    def _start_web(self) -> Any:
        """The results web app in a thread of this process (web.with_watch), as
        `cxrbatch serve` would run it; it imports no torch."""
        from cxrbatch.web import serving
        from cxrbatch.web.app import create_app
        from cxrbatch.web.auth import check_binding

        web = self.settings.web
        check_binding(web, web.host)
        sock = serving.bind(web.host, web.port)
        server = serving.server(create_app(self.site), web.host, web.port)
        # In a thread uvicorn leaves the signals alone: SIGTERM stays the daemon's drain.
        threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="cxrbatch-web", daemon=True
        ).start()
        log.info("web app on http://%s:%d/", web.host, web.port)
        return server

    def _metrics_if_due(self) -> None:
        textfile = self.settings.metrics.textfile
        now = time.monotonic()
        if not textfile or now < self._metrics_due:
            return
        self._metrics_due = now + self.settings.metrics.textfile_interval_seconds
        try:
            alive = sum(1 for child in self._children if child.is_alive())
            write_textfile(self.sessions, Path(textfile), alive)
        except Exception as exc:  # monitoring must not stop ingest
            log.warning("metrics textfile not written: %s", one_line(exc))

    def _retention_if_due(self) -> None:
        """The retention policy every retention.interval_hours (first after one interval:
        a restart loop must not turn into a deletion loop)."""
        interval = self.settings.retention.interval_hours * 3600.0
        now = time.monotonic()
        if interval <= 0:
            return
        if self._retention_due is None:
            self._retention_due = now + interval
        if now < self._retention_due:
            return
        self._retention_due = now + interval
        try:
            cleanup(self.site)
        except Exception as exc:  # a failed pass must not stop ingest; the next one retries
            log.error("retention pass failed: %s", one_line(exc))
            log.debug("retention pass failed", exc_info=True)

    def _spool(self, mode: str) -> Spool:
        return Spool.for_site(self.site, self.sessions, mode)

    def _start_ingest(self) -> FolderIngest:
        assert self.input_dir is not None
        spool = self._spool(self.settings.ingest.mode)
        spool.recover()
        ingest = FolderIngest(self.input_dir, spool, self.settings.ingest)
        ingest.start()
        return ingest

    def _start_receiver(self) -> DicomReceiver:
        # Received instances always move into the spool: _incoming is only a landing place.
        receiver = DicomReceiver(self.settings.dicom, self._spool("move"), self.site.incoming_dir)
        receiver.start()
        return receiver

    def _spawn_worker(self) -> None:
        threads = threads_per_worker(self.workers)
        child = self._context.Process(
            target=worker_process_main,
            args=(self.site, threads, os.getpid()),
            name="cxrbatch-worker",
            daemon=False,
        )
        child.start()
        self._children.append(child)
        self._started_at[id(child)] = time.monotonic()
        log.info("worker process %d started (%d CPU threads)", child.pid, threads)

    def _replace_dead_workers(self) -> None:
        """Replace workers that died; stop the service if they cannot start at all."""
        now = time.monotonic()
        for child in list(self._children):
            if child.is_alive():
                continue
            self._children.remove(child)
            lived = now - self._started_at.pop(id(child), now)
            if child.exitcode == EXIT_CANNOT_START:
                log.error("a worker cannot start (see its error above); the service stops")
                self.exit_code = 2
                self.stop_requested.set()
                return
            # A worker that keeps dying young is restarted ever more slowly (up to 5 min).
            self._quick_deaths = self._quick_deaths + 1 if lived < 60 else 0
            delay = min(300.0, 2.0**self._quick_deaths) if self._quick_deaths else 0.0
            self._respawn_after = max(self._respawn_after, now + delay)
            log.error(
                "worker process %d exited (code %s) after %.0f s; another starts in %.0f s",
                child.pid,
                child.exitcode,
                lived,
                delay,
            )
        while len(self._children) < self.workers and now >= self._respawn_after:
            self._spawn_worker()

    def _signal_workers(self) -> None:
        """SIGTERM to every live worker: each stops claiming and starts its grace (a second
        signal changes nothing for a worker already stopping)."""
        for child in list(self._children):
            if child.is_alive() and child.pid is not None:
                # One that died since is_alive() is seen by the join.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)

    def _drain(self) -> None:
        grace = self.settings.queue.drain_grace_seconds
        self._signal_workers()  # a worker started after the signal, or a stop not by signal
        deadline = time.monotonic() + grace + 15  # workers release their study at `grace`
        for child in self._children:
            child.join(max(0.0, deadline - time.monotonic()))
            if child.is_alive():
                log.error("worker process %d did not stop; killed", child.pid)
                child.kill()
                child.join(5)
        self._children.clear()
        log.info("all workers stopped")
