"""What the queue loses, the database finds again: a killed worker, a Redis restart."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from melanoscreen.cli.supervisor import free_port
from tests.conftest import (
    RedisServer,
    Service,
    children_of,
    start_service,
    synthetic_jpeg,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of this module's own: these tests kill it."""
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis-resilience"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def fragile(tmp_path_factory: pytest.TempPathFactory, own_redis: RedisServer,
            tiny_model: Path) -> Iterator[Service]:
    """Watcher and beat running; each test starts the worker itself."""
    running = start_service(tmp_path_factory.mktemp("resilience"), own_redis.url, tiny_model,
                            names=("beat", "watch"))
    yield running
    running.stop_all()


def _screened_exactly_once(service: Service, prefix: str) -> None:
    rows = service.rows(
        "SELECT i.source, i.status, count(p.id) AS n FROM images i "
        "LEFT JOIN predictions p ON p.image_id = i.id WHERE i.source LIKE :p GROUP BY i.id",
        p=f"{prefix}%")
    assert rows, prefix
    assert {(r.status, r.n) for r in rows} == {("screened", 1)}, rows


def test_a_worker_killed_mid_batch_still_screens_every_image_once(fragile: Service) -> None:
    worker = fragile.start("worker")
    # The pool process is warm before its first task, so a batch can be claimed and finished
    # between two looks at the database. When that happens, nothing was killed: drop a new set
    # and look again, until a batch is caught while it is claimed.
    for attempt in range(6):
        prefix = f"killed-{attempt}/"
        for i in range(8):
            fragile.drop(f"{prefix}img-{i}.jpg", synthetic_jpeg(20_000 + 10 * attempt + i))

        def claimed_or_finished(prefix: str = prefix) -> str | None:
            if fragile.rows("SELECT id FROM images WHERE status = 'screening'"):
                return "claimed"
            finished = [r for r in fragile.images_under(prefix) if r.status == "screened"]
            return "finished" if len(finished) == 8 else None

        seen = wait_until(claimed_or_finished, interval=0.01, message="a claimed batch")
        if seen == "claimed":
            pool = children_of(worker.pid)
            assert pool, "the worker has no pool process"
            for pid in pool:
                os.kill(pid, signal.SIGKILL)
            break
    else:
        pytest.fail("every batch finished before it could be seen claimed, in 6 drops")
    fragile.wait_finished("killed-", 8 * (attempt + 1), timeout=180)
    _screened_exactly_once(fragile, "killed-")
    assert "WorkerLostError" in fragile.log("worker") or "SIGKILL" in fragile.log("worker")


def test_a_redis_restart_that_loses_the_queue_still_screens_every_image_once(
        fragile: Service, own_redis: RedisServer) -> None:
    fragile.stop("worker")
    for i in range(6):
        fragile.drop(f"lost/img-{i}.jpg", synthetic_jpeg(21_000 + i))
    wait_until(lambda: len(fragile.rows(
        "SELECT id FROM images WHERE source LIKE 'lost/%' AND enqueued_at IS NOT NULL")) == 6,
        message="six queued images")
    client = redis.Redis.from_url(own_redis.url)
    assert client.llen("celery") > 0
    own_redis.restart_empty()
    assert client.llen("celery") == 0
    fragile.start("worker")
    fragile.wait_finished("lost/", 6, timeout=180)
    _screened_exactly_once(fragile, "lost/")
    # The watcher reconnected too: a new drop after the restart goes straight through.
    fragile.drop("lost/after-restart.jpg", synthetic_jpeg(21_100))
    fragile.wait_finished("lost/after", 1)
    _screened_exactly_once(fragile, "lost/")
