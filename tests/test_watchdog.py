"""kernel.watchdog: deadlines kept by one thread per process, disarmed exactly."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from kernel.watchdog import Watchdog
from tests.conftest import in_forked_child


def threads_named(name: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name == name)


def test_an_alarm_fires_at_its_deadline_and_one_disarmed_in_time_never_does() -> None:
    dog = Watchdog("test-watchdog-fires")
    rang = threading.Event()
    started = time.monotonic()
    alarm = dog.arm(0.2, rang.set)
    assert rang.wait(5) and time.monotonic() - started >= 0.2
    assert alarm.fired and alarm.disarm() is True and alarm.disarm() is True

    quiet = threading.Event()
    kept = dog.arm(0.1, quiet.set)
    assert kept.disarm() is False and not kept.fired
    assert not quiet.wait(0.4) and dog.pending() == 0
    assert kept.disarm() is False  # the same answer again


def test_a_sooner_alarm_armed_later_fires_first() -> None:
    dog = Watchdog("test-watchdog-order")
    order: list[str] = []
    done = threading.Event()
    dog.arm(0.6, lambda: (order.append("late"), done.set()))
    time.sleep(0.05)  # the thread now sleeps until the late one
    dog.arm(0.1, lambda: order.append("soon"))
    assert done.wait(5) and order == ["soon", "late"]


def test_disarm_waits_for_an_action_already_running() -> None:
    """Once disarm returns, no cut is still on its way: it waits for the action's end."""
    dog = Watchdog("test-watchdog-running")
    running, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow_cut() -> None:
        running.set()
        release.wait(5)
        finished.set()

    alarm = dog.arm(0.01, slow_cut)
    assert running.wait(5)
    threading.Timer(0.2, release.set).start()
    assert alarm.disarm() is True and finished.is_set()


def test_an_action_that_raises_is_logged_and_the_others_still_run(caplog) -> None:
    caplog.set_level(logging.ERROR, logger="kernel.watchdog")
    dog = Watchdog("test-watchdog-raises")
    after = threading.Event()

    def broken() -> None:
        raise RuntimeError("broken cut")

    first = dog.arm(0.01, broken)
    dog.arm(0.1, after.set)
    assert after.wait(5) and first.disarm() is True
    assert "an alarm's action failed" in caplog.text and "broken cut" in caplog.text


def test_one_thread_keeps_every_alarm() -> None:
    dog = Watchdog("test-watchdog-one-thread")
    rang = threading.Semaphore(0)
    before = threading.active_count()
    alarms = [dog.arm(0.05 + (i % 7) / 100, rang.release) for i in range(50)]
    kept = alarms[::5]
    assert not any(a.disarm() for a in kept)  # disarmed in time: never fire
    assert threading.active_count() == before + 1
    assert threads_named("test-watchdog-one-thread") == 1
    for _ in range(40):
        assert rang.acquire(timeout=5)
    assert not rang.acquire(timeout=0.3)  # and no more than those
    assert all(a.fired for a in alarms if a not in kept) and not any(a.fired for a in kept)
    assert threads_named("test-watchdog-one-thread") == 1 and dog.pending() == 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads running
def test_a_forked_child_keeps_its_own_alarms_not_its_parent_s() -> None:
    """gunicorn forks its workers: the child has no copy of the parent's thread and must not
    fire the parent's alarms (their connections are the parent's); its own alarms work."""
    dog = Watchdog("test-watchdog-fork")
    parents = threading.Event()
    parent_alarm = dog.arm(0.3, parents.set)

    def child() -> bool:
        if dog.pending() != 0:
            return False
        rang = threading.Event()
        dog.arm(0.05, rang.set)
        return rang.wait(5) and not parents.wait(0.5)

    assert in_forked_child(child)
    assert parents.wait(5) and parent_alarm.fired  # the parent's own still fires, here
