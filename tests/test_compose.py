"""The compose deployment, built and run for real: three worker containers, a killed one, an
alert, and the stack down and up again with its data.

Runs where a Docker daemon answers (`.ci/run` starts one where it can), else is skipped with
the reason. The images come from deploy/local-images.sh (Debian packages; Docker's layer cache
makes a second build quick), once per module; the stack is one compose project whose volumes
are removed at the end. The tests run in order, on one growing database.
"""

from __future__ import annotations

import os
import time
import urllib.error
from collections.abc import Iterator

import pytest
from compose_stack import (
    Stack,
    build_images,
    docker_problem,
    kill_container,
    lesion_jpeg,
    pause_container,
    unpause_container,
    wait_for,
)

from melanoscreen.celeryconfig import SCREEN_BATCH

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

BURST = 500
KILL_BURST = 300
#: Seeds far apart: every image of every burst is a distinct content.
BURST_SEED, KILL_SEED, AFTER_UP_SEED = 1_000_000, 2_000_000, 3_000_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The deployment built from local images and up with three workers; removed afterwards."""
    problem = docker_problem()
    if problem:
        pytest.skip(f"compose tests need Docker: {problem}")
    started = time.monotonic()
    images = build_images()
    built = time.monotonic() - started
    stack = Stack(project=f"melanoscreen-test-{os.getpid()}",
                  folder=tmp_path_factory.mktemp("compose"), images=images,
                  extra={"MELANOSCREEN_LOG_LEVEL": "DEBUG"})
    try:
        took = stack.up(workers=3)
        print(f"\nbuild {built:.0f} s, up with 3 workers {took:.0f} s")
        yield stack
    except Exception:
        print(stack.logs())
        raise
    finally:
        stack.down(volumes=True)


def _count(stack: Stack, prefix: str, *, status: str | None = None) -> int:
    where = f"source LIKE '{prefix}-%'" + (f" AND status = '{status}'" if status else "")
    return stack.scalar(f"SELECT count(*) FROM images WHERE {where}")


def _screened_once(stack: Stack, prefix: str) -> tuple[int, int, int]:
    """(images, images screened, images with exactly one prediction) for a burst."""
    rows = stack.sql(
        "SELECT count(*), count(*) FILTER (WHERE i.status = 'screened'), "
        "count(*) FILTER (WHERE (SELECT count(*) FROM predictions p WHERE p.image_id = i.id) = 1) "
        f"FROM images i WHERE i.source LIKE '{prefix}-%'")
    images, screened, once = (int(v) for v in rows[0])
    return images, screened, once


def _burst(prefix: str, count: int, seed: int) -> dict[str, bytes]:
    return {f"{prefix}-{i:04d}.jpg": lesion_jpeg(seed + i) for i in range(count)}


def test_the_stack_runs_migrations_once_and_shows_nothing_without_a_login(stack: Stack) -> None:
    assert stack.unhealthy() == []
    migrate = stack.run("ps", "-q", "migrate").stdout.decode().split()
    assert len(migrate) == 1
    assert stack.scalar("SELECT count(*) FROM alembic_version") == 1
    assert len(stack.containers("worker")) == 3
    assert stack.http_status("FLOWER_PORT", "/api/workers") == 401
    assert stack.http_status("WEB_PORT", "/api/images") == 401
    assert stack.http_status("WEB_PORT", "/healthz") == 200
    assert stack.http_status("MAILCATCHER_PORT", "/api/v1/messages") == 401


def test_three_workers_screen_a_burst_of_500_each_exactly_once(stack: Stack) -> None:
    files = _burst("burst", BURST, BURST_SEED)
    started = time.monotonic()
    stack.drop(files)
    wait_for(lambda: _screened_once(stack, "burst") == (BURST, BURST, BURST), timeout=300,
             what=f"{BURST} images screened", detail=lambda: f"{_screened_once(stack, 'burst')}")
    took = time.monotonic() - started
    print(f"\n{BURST} images screened by 3 workers in {took:.1f} s ({BURST / took:.1f} images/s)")
    assert stack.scalar("SELECT count(*) FROM predictions") == BURST

    # Flower (with its login) lists the three workers, and each of them screened batches.
    workers = stack.flower("/api/workers?refresh=1")
    screened_by = {name: (info.get("stats") or {}).get("total", {}).get(SCREEN_BATCH, 0)
                   for name, info in workers.items()}
    assert len(screened_by) == 3, screened_by
    assert all(batches > 0 for batches in screened_by.values()), screened_by


def test_an_alert_reaches_the_smtp_catcher(stack: Stack) -> None:
    flagged = stack.scalar("SELECT count(*) FROM images WHERE flagged")
    assert flagged > 0, "the burst has images the shipped model flags"
    mail = wait_for(lambda: (answer := stack.mail())["total"] > 0 and answer, timeout=120,
                    what="an alert in the mail catcher")
    subjects = [m["Subject"] for m in mail["messages"]]
    assert any("Melanoma suspected" in subject for subject in subjects), subjects
    assert all(m["To"] == [{"Address": "oncall@clinic.example"}] for m in mail["messages"])


def _frozen_mid_batch(stack: Stack) -> tuple[str, str] | None:
    """A worker container frozen (`docker pause`) while it holds claimed images of the kill
    burst: (its id, the claim's token, which is the task id). None when none is caught so."""
    tokens = stack.sql("SELECT DISTINCT claim_token FROM images WHERE status = 'screening' "
                       "AND source LIKE 'kill-%' AND claim_token IS NOT NULL")
    for (token,) in tokens:
        try:
            worker = str(stack.flower(f"/api/task/info/{token}").get("worker", ""))
        except urllib.error.HTTPError:
            continue  # Flower has not had the task's events yet
        hostname = worker.rpartition("@")[2]  # a container's hostname: its id's first 12
        victim = next((c for c in stack.containers("worker") if hostname and c.startswith(hostname)),
                      None)
        if victim is None:
            continue
        pause_container(victim)
        if stack.scalar(f"SELECT count(*) FROM images WHERE claim_token = '{token}' "
                        "AND status = 'screening'"):
            return victim, token
        unpause_container(victim)  # it finished that batch just before: try again
    return None


def test_a_worker_container_killed_mid_batch_loses_nothing(stack: Stack) -> None:
    stack.drop(_burst("kill", KILL_BURST, KILL_SEED))
    # Caught holding a batch: frozen, so that the kill surely lands mid-batch.
    victim, token = wait_for(lambda: _frozen_mid_batch(stack), timeout=120, interval=0.1,
                             what="a worker caught screening the burst")
    kill_container(victim)
    killed_at = time.monotonic()
    lost = stack.scalar(f"SELECT count(*) FROM images WHERE claim_token = '{token}'")
    assert lost > 0
    assert _count(stack, "kill", status="screened") < KILL_BURST, "killed too late to tell"
    wait_for(lambda: _screened_once(stack, "kill") == (KILL_BURST, KILL_BURST, KILL_BURST),
             timeout=120, what="every image screened after the kill",
             detail=lambda: f"{_screened_once(stack, 'kill')}")
    print(f"\nall {KILL_BURST} screened {time.monotonic() - killed_at:.0f} s after the kill "
          f"({lost} of them were in the killed worker's batch)")
    # The killed batch was claimed twice (by the dead worker, then again after its lease ran
    # out) and screened once: nothing lost, nothing doubled.
    assert stack.scalar("SELECT count(*) FROM images WHERE source LIKE 'kill-%' "
                        "AND attempts = 2") >= lost
    assert stack.scalar("SELECT count(*) FROM predictions") == BURST + KILL_BURST
    assert stack.scalar("SELECT count(*) FROM images WHERE status <> 'screened'") == 0


def _online_workers(stack: Stack) -> int:
    """How many workers Flower sees answering now."""
    return sum(1 for online in stack.flower("/api/workers?status=1").values() if online)


def _sweeps_done(stack: Stack) -> int:
    """How many sweeps the workers finished since they started: each says so at DEBUG (the stack
    runs at that level; sweeps send Flower no events, so its task list keeps screening)."""
    logs = stack.run("logs", "--no-color", "worker", check=False).stdout.decode(errors="replace")
    return logs.count("sweep: nothing lost") + logs.count("sweep re-enqueued")


def test_down_and_up_keeps_the_results_and_screens_nothing_again(stack: Stack) -> None:
    facts = ("SELECT (SELECT count(*) FROM predictions), (SELECT max(created_at) FROM predictions), "
             "(SELECT sum(attempts) FROM images), (SELECT max(screened_at) FROM images)")
    before = stack.sql(facts)
    stack.down()
    took = stack.up(workers=3)
    print(f"\nup again in {took:.0f} s")
    # Every worker back, and the sweep (every 15 s) run twice since: what the sweep would
    # re-enqueue after a restart has had its chance to show.
    wait_for(lambda: _online_workers(stack) == 3 and _sweeps_done(stack) >= 2, timeout=120,
             what="three workers online and two sweeps done after up",
             detail=lambda: f"{_online_workers(stack)} workers, {_sweeps_done(stack)} sweeps")
    assert stack.sql(facts) == before
    assert stack.scalar("SELECT count(*) FROM images WHERE status <> 'screened'") == 0
    # And it still works: one new image, screened once.
    stack.drop(_burst("after-up", 1, AFTER_UP_SEED))
    wait_for(lambda: _screened_once(stack, "after-up") == (1, 1, 1), timeout=120,
             what="a new image screened after up")
    assert stack.scalar("SELECT count(*) FROM predictions") == int(before[0][0]) + 1

