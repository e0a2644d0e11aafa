"""The service's commands: up, watch, worker, beat, flower, dicom, migrate.

Imports stay inside the commands so that `melanoscreen --help` is fast and never loads TensorFlow.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from melanoscreen.cli._common import (
    BROKER_FILE,
    LOCK_FILES,
    SUPERVISOR_PID,
    broker_or_fail,
    fail,
    flower_password,
    hold_data_folder,
    load_settings,
    make_private,
    ping_broker,
    upgrade_schema,
    web_address,
    web_secret,
    write_private,
)

if TYPE_CHECKING:
    from pathlib import Path

    from melanoscreen.cli.supervisor import Child
    from melanoscreen.settings import Settings

logger = logging.getLogger(__name__)


def _prepare(settings: Settings) -> None:
    """Create the data folder (0700, umask 0077) and inbox; bring the schema up to date."""
    make_private(settings)
    settings.inbox_dir.mkdir(parents=True, exist_ok=True)
    if settings.store_dir.is_relative_to(settings.inbox_dir):
        fail("MELANOSCREEN_INBOX: must not contain the data folder's store")
    upgrade_schema(settings)
    if not settings.first_start_file.exists():
        write_private(settings.first_start_file, datetime.now(UTC).isoformat() + "\n")


def migrate() -> None:
    """Prepare the data folder and bring the database schema to the latest revision, then exit
    (a deployment's one-shot step before its services start; they upgrade on start too)."""
    settings = load_settings()
    _prepare(settings)
    typer.echo(f"database schema up to date; data folder {settings.data_path}")


def warn_if_nobody_is_told(settings: Settings) -> None:
    """Log, at start, that flagged images will be recorded but nobody emailed."""
    if not settings.alert.anyone:
        logger.warning("MELANOSCREEN_ALERT_RECIPIENTS is empty: flagged images are recorded "
                       "(melanoscreen results --flagged) but nobody will be told")


def record_recipients(settings: Settings) -> None:
    """Write who this worker emails into the data folder (0600), for `status` in any shell."""
    import json

    alert = settings.alert
    write_private(settings.recipients_file, json.dumps({
        "recipients": alert.recipients, "routes": alert.routes,
        "escalate_to": settings.escalate_to, "pid": os.getpid(),
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds")}) + "\n")


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handle(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


def watch(polling: Annotated[bool, typer.Option(
        "--polling", help="Poll for files whose size and mtime are stable (network shares).")]
          = False) -> None:
    """Watch the inbox: take each complete file into the store and enqueue it for screening."""
    from db.session import make_session_factory
    from scheduler.queue import make_producer, send_screen_batch
    from scheduler.watcher import Watcher

    settings = load_settings()
    producer = make_producer(broker_or_fail(settings), settings.visibility_timeout)
    make_private(settings)
    hold_data_folder(settings, "watch")  # its descriptor stays open: held while we live
    _prepare(settings)
    watcher = Watcher(settings, make_session_factory(settings.database),
                      lambda ids: send_screen_batch(producer, ids), polling=polling)
    watcher.run(_stop_on_signals())


def worker(concurrency: Annotated[int | None, typer.Option(
        min=1, help="Pool processes (default: MELANOSCREEN_WORKER_CONCURRENCY, else cores/2).")]
           = None) -> None:
    """Run a Celery worker that screens images, delivers alerts and writes the digests."""
    from melanoscreen.celeryconfig import broker_options
    from worker import runtime
    from worker.celery_app import app

    settings = load_settings()
    quiet_celery(settings.log_level)
    broker = broker_or_fail(settings)
    _check_model(settings)
    _prepare(settings)
    warn_if_nobody_is_told(settings)
    record_recipients(settings)
    cores = os.cpu_count() or 1
    processes = concurrency or settings.worker_concurrency or max(1, cores // 2)
    runtime.configure(settings, intra_op_threads=max(1, cores // processes))
    app.conf.update(broker_options(broker, settings.visibility_timeout))
    # Each pool process loads and warms the model before its first task (worker_process_init):
    # give it time to, instead of Celery's 4 s before it replaces the process.
    app.conf.worker_proc_alive_timeout = 180.0
    # --quiet: no banner. Task events stay on (Flower); housekeeping tasks send none.
    app.worker_main(["--quiet", "worker", f"--loglevel={settings.log_level}",
                     f"--concurrency={processes}",
                     "--pool=prefork", "--events",
                     f"--hostname={worker_node_name(os.getpid())}"])


#: Celery's loggers that say something for every task (received, succeeded), at start
#: (mingle) or on every beat tick: the service logs one line of its own per batch screened and
#: per message sent instead, so these speak only of trouble (warnings and errors still show).
CHATTY_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "celery.worker.consumer.mingle",
                  "celery.beat")


def quiet_celery(level: str) -> None:
    """Keep the service log to what an operator reads: no per-task lines from Celery (unless
    `level` is DEBUG), no TensorFlow start-up notices, no run-as-root warning (the service
    never takes pickle)."""
    import warnings

    from celery.exceptions import SecurityWarning

    if level != "DEBUG":
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    # Read by TensorFlow's C++ side when a pool process loads the model: warnings and errors only.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", category=SecurityWarning)


def _check_model(settings: Settings) -> None:
    """MELANOSCREEN_MODEL must name a readable file (else images would wait, then fail)."""
    model = settings.model
    if model is not None and not (model.is_file() and os.access(model, os.R_OK)):
        fail(f"MELANOSCREEN_MODEL: no readable model file at {model.absolute()}")


def worker_node_name(pid: int) -> str:
    """The Celery node name of the worker whose main process is `pid` (`up` asks it by name)."""
    return f"melanoscreen-{pid}@{socket.gethostname()}"


def beat() -> None:
    """Send the periodic tasks: the sweep that re-enqueues lost work, and the nightly digest."""
    from scheduler.queue import beat_schedule, make_producer, send_queue_digests

    settings = load_settings()
    broker = broker_or_fail(settings)
    make_private(settings)
    hold_data_folder(settings, "beat")  # its descriptor stays open: held while we live
    _prepare(settings)
    app = make_producer(broker, settings.visibility_timeout)
    # Beat sends only housekeeping (sweep, digest, reminders): no "sent" events for Flower to
    # keep, so its task list holds screening and deliveries (the worker's tasks say the same).
    app.conf.task_send_sent_event = False
    app.conf.beat_schedule = beat_schedule(settings.sweep.interval)
    app.conf.beat_max_loop_interval = min(settings.sweep.interval, 30.0)
    schedule = settings.data_path / "celerybeat-schedule"
    # At start too: a digest missed while the service was down goes out now, not a minute later.
    send_queue_digests(app)
    quiet_celery(settings.log_level)
    app.Beat(schedule=str(schedule), loglevel=settings.log_level, quiet=True).run()


#: Tasks Flower keeps in memory (its default, 100,000, grew it ~0.45 MiB/min under load).
FLOWER_MAX_TASKS = 2000


def _check_flower(settings: Settings) -> None:
    dashboard = settings.flower
    if not dashboard.is_loopback and not (dashboard.user and dashboard.password):
        fail(f"MELANOSCREEN_FLOWER_ADDRESS: {dashboard.address} is not loopback; set "
             "MELANOSCREEN_FLOWER_USER and MELANOSCREEN_FLOWER_PASSWORD to expose Flower")


def _check_port_free(setting: str, address: str, port: int) -> None:
    """Fail naming `setting` when something else listens on (address, port) already."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            fail(f"{setting}: cannot listen on {address}:{port}: {exc.strerror or exc} "
                 "(another program has it?)")


def flower() -> None:
    """Run Flower (the live dashboard) on the same broker, its pages and API behind basic auth."""
    settings = load_settings()
    broker = broker_or_fail(settings)
    make_private(settings)
    dashboard = settings.flower
    _check_flower(settings)
    password, generated = flower_password(settings)
    if generated:
        # Never on standard output, which ends up in whatever log the operator keeps.
        typer.echo(f"dashboard user {dashboard.login}; its password is in "
                   f"{settings.flower_password_file} (readable by this user only)")
    # Secrets go through the environment (readable by this user only), never the command line.
    # With auth on, Flower sends no `Access-Control-Allow-Origin: *`.
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_UNAUTHENTICATED_API"}
    env["FLOWER_BASIC_AUTH"] = f"{dashboard.login}:{password}"
    env["CELERY_BROKER_URL"] = broker
    # Flower's own command, with /metrics and /healthcheck behind the login too.
    argv = [sys.executable, "-m", "melanoscreen.cli.flower_app", "flower",
            f"--address={dashboard.address}",
            f"--port={dashboard.port}", "--persistent=False",
            # Flower keeps every task it has seen (about 1 KiB each): bounded, its memory is.
            f"--max_tasks={FLOWER_MAX_TASKS}",
            # Its start-up listing and per-request lines stay out of the service log.
            "--logging=warning"]
    os.execve(sys.executable, argv, env)


def _check_dicom(settings: Settings) -> None:
    """The listener's settings, before it starts: a port, and someone allowed to call."""
    dicom = settings.dicom
    if dicom.port is None:
        fail("MELANOSCREEN_DICOM_PORT: not set; the DICOM listener needs a port (104 or 11112 "
             "are usual)")
    if not dicom.peers:
        fail("MELANOSCREEN_DICOM_PEERS: empty; list the AE titles allowed to send "
             "(MODALITY1@10.0.0.5,PACS): the listener accepts no one else")
    _check_port_free("MELANOSCREEN_DICOM_PORT", dicom.address, dicom.port)


def dicom() -> None:
    """Run the DICOM listener (a Storage SCP): C-ECHO, and C-STORE of VL Photographic, VL
    Microscopic and Secondary Capture images from MELANOSCREEN_DICOM_PEERS into the inbox."""
    from scheduler.listener import Listener
    from service.dicom import pseudonym_key

    settings = load_settings()
    make_private(settings)
    _check_dicom(settings)
    # pynetdicom's own INFO lines describe each request; ours say what matters, without the
    # dataset (whose patient module must never reach a log).
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # This process stores what it is sent and reads no value of it (the watcher and the worker
    # do, with pydicom's checks): checking every value of every command set it answers cost a
    # tenth of its time per object, and pynetdicom's describing handlers (each request decoded
    # into lines for its logger) another twentieth.
    import pydicom.config
    from pynetdicom import _config as pynetdicom_config

    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    settings.inbox_dir.mkdir(parents=True, exist_ok=True)
    listener = Listener(settings.dicom, settings.inbox_dir,
                        lambda: pseudonym_key(settings.dicom_key_file),
                        max_bytes=settings.max_file_bytes)
    if settings.dicom.pseudonymise:
        pseudonym_key(settings.dicom_key_file)  # made now: a full disk fails at start, not later
    stop = _stop_on_signals()
    try:
        listener.start()
    except OSError as exc:
        fail(f"MELANOSCREEN_DICOM_PORT: cannot listen on {settings.dicom.address}:"
             f"{settings.dicom.port}: {exc.strerror or exc}")
    dicom_settings = settings.dicom
    logger.info("DICOM listener %s on %s:%d; peers %s", dicom_settings.ae_title,
                dicom_settings.address, dicom_settings.port,
                ", ".join(p.ae_title + (f"@{p.address}" if p.address else "")
                          for p in dicom_settings.peers))
    try:
        stop.wait()
    finally:
        listener.stop()


def _consumes_the_queue(broker: str) -> Callable[[Child], bool]:
    """A check for `up`'s worker: asked through the broker, does it still consume the queue?"""
    from melanoscreen.celeryconfig import QUEUE
    from scheduler.queue import make_producer

    app = make_producer(broker)

    def check(child: Child) -> bool:
        if child.process is None:
            return False
        name = worker_node_name(child.process.pid)
        replies = app.control.inspect(destination=[name], timeout=3.0).active_queues() or {}
        return any(queue.get("name") == QUEUE for queue in replies.get(name, []))

    return check


def _remove_new(paths: list[Path]) -> None:
    """Remove these files, then these folders if empty: what a failed start had created."""
    for path in sorted(paths, key=lambda p: len(p.parts), reverse=True):
        try:
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
        except OSError:
            pass  # not empty (or not ours to remove): left as it is


def up() -> None:
    """Start everything: Redis (unless MELANOSCREEN_BROKER_URL), watcher, worker, beat, Flower."""
    from melanoscreen.cli.supervisor import (
        Child,
        Supervisor,
        free_port,
        redis_argv,
        redis_executable,
        redis_version,
        wait_for_redis,
    )

    settings = load_settings()
    # What this start creates before its checks pass: removed again when one fails, so a
    # mistake leaves no empty data folder with lock files behind (and nothing else is touched).
    data = settings.data_path
    new = [path for path in (data, *(data / name for name in LOCK_FILES.values()))
           if not path.exists()]
    try:
        make_private(settings)
        hold_data_folder(settings, "up")  # its descriptor stays open: held while we live
        # An operator's mistake is one line before anything starts, not a child that keeps dying.
        _check_model(settings)
        _check_flower(settings)
        _check_port_free("MELANOSCREEN_FLOWER_PORT", settings.flower.address, settings.flower.port)
        _check_port_free("MELANOSCREEN_WEB_PORT", settings.web.address, settings.web.port)
        if settings.dicom.enabled:
            _check_dicom(settings)
        if settings.redis_port and not settings.broker_url:
            _check_port_free("MELANOSCREEN_REDIS_PORT", "127.0.0.1", settings.redis_port)
        if settings.broker_url:
            ping_broker(settings.broker_url)
    except typer.Exit:
        _remove_new(new)
        raise
    _prepare(settings)
    warn_if_nobody_is_told(settings)
    data_dir = settings.data_path
    env = dict(os.environ, MELANOSCREEN_DATA_DIR=str(data_dir), **{SUPERVISOR_PID: str(os.getpid())},
               MELANOSCREEN_INBOX=str(settings.inbox_dir),
               MELANOSCREEN_DATABASE_URL=settings.database)
    env.pop("FLOWER_UNAUTHENTICATED_API", None)
    children: list[Child] = []
    broker_file = data_dir / BROKER_FILE
    if settings.broker_url:
        broker = settings.broker_url
    else:
        port = settings.redis_port or free_port()
        # A fresh password per start: only this user can read it (broker.url, 0600, in the
        # 0700 data folder; the children get it through their environment).
        password = secrets.token_hex(32)
        server = redis_executable()
        typer.echo(f"broker:    embedded redis-server {redis_version(server)} ({server})")
        redis = Child("redis", redis_argv(port, data_dir / "redis", password=password))
        redis.start()
        children.append(redis)
        try:
            wait_for_redis(port, password=password)
        except TimeoutError as exc:
            redis.signal_group(signal.SIGKILL)
            fail(f"{exc} (its log: {data_dir / 'redis' / 'redis.log'})")
        broker = f"redis://:{password}@127.0.0.1:{port}/0"
        write_private(broker_file, broker + "\n")
    env["MELANOSCREEN_BROKER_URL"] = broker
    flower_password(settings)  # made (0600) before Flower's child reads it
    me = [sys.executable, "-m", "melanoscreen"]
    # The worker is asked through the broker whether it consumes: a worker told to stop
    # consuming (Flower's cancel-consumer) stays up doing nothing, and must be restarted.
    worker_child = Child("worker", [*me, "worker"], env, check=_consumes_the_queue(broker),
                         check_interval=settings.worker_check_interval)
    children.append(worker_child)
    children += [Child(name, [*me, name], env) for name in ("beat", "flower", "watch", "web")]
    if settings.dicom.enabled:
        children.append(Child("dicom", [*me, "dicom"], env))
    # The review app's cookie key is made here, before its child starts (it is kept across starts).
    web_secret(settings)
    typer.echo(f"inbox:     {settings.inbox_dir}  (drop images here)")
    typer.echo(f"review:    {web_address(settings)}  (accounts: melanoscreen users add NAME "
               "--email ADDR --password-stdin)")
    typer.echo(f"dashboard: http://{settings.flower.address}:{settings.flower.port}  "
               f"(user {settings.flower.login})")
    typer.echo(f"           its password is in {settings.flower_password_file} (this user only)")
    typer.echo(f"results:   melanoscreen results   (data in {data_dir})")
    if settings.dicom.enabled:
        typer.echo(f"dicom:     AE title {settings.dicom.ae_title} on {settings.dicom.address}:"
                   f"{settings.dicom.port}  (peers: "
                   f"{', '.join(p.ae_title for p in settings.dicom.peers)})")
    stop = _stop_on_signals()
    threading.Thread(target=_say_ready, args=(settings, worker_child, broker, stop),
                     daemon=True).start()
    code = Supervisor(children).run(stop)
    if not settings.broker_url:
        broker_file.unlink(missing_ok=True)
    typer.echo(f"stopped: {', '.join(child.name for child in children)} ended; "
               f"data in {data_dir}")
    if code:
        fail("a service kept dying; see the log above")


def _say_ready(settings: Settings, worker_child: Child, broker: str,
               stop: threading.Event) -> None:
    """Print "ready" once the worker consumes the queue with its model loaded (its pool
    processes warm it before they start) and the broker answers; the database is checked."""
    import time

    check = _consumes_the_queue(broker)
    started = time.monotonic()
    while not stop.wait(0.5):
        try:
            if check(worker_child):
                break
        except Exception as exc:  # the broker's errors vary by transport
            logger.debug("not ready yet: %s", exc)
    else:
        return
    typer.echo(f"ready in {time.monotonic() - started:.0f} s: drop images into "
               f"{settings.inbox_dir}; dashboard http://{settings.flower.address}:"
               f"{settings.flower.port}; review {web_address(settings)}")


def register(app: typer.Typer) -> None:
    """Add the service's commands to the `melanoscreen` app."""
    for command in (up, watch, worker, beat, flower, dicom, migrate):
        app.command()(command)
