"""
L{ksproxy.reactor.KsproxyReactor.doPoll} with C{busyPoll}: right after a request went upstream
(C{awaitingReply.soon}), a poll that finds nothing keeps polling without sleeping for up to that long, and
only then sleeps in C{epoll_wait} for what is left of the timeout.  Other turns sleep at once.
"""

from __future__ import annotations

import select
import unittest as pyunittest
from typing import Any, List, Tuple

from twisted.trial.unittest import SynchronousTestCase

from ksproxy import reactor as reactorModule
from ksproxy.http.writes import awaitingReply
from ksproxy.reactor import SPIN_MISSES, SPIN_RETRY_EVERY, KsproxyReactor

SPIN = 100e-6


class _ScriptedPoller:
    """Answers each poll from a script (empty lists unless told otherwise); each poll advances the clock."""

    def __init__(self, clock: List[float], answers: List[List[Tuple[int, int]]], cost: float) -> None:
        self.clock = clock
        self.answers = answers
        self.cost = cost
        self.calls: List[float] = []

    def poll(self, timeout: float, maxevents: int) -> List[Tuple[int, int]]:
        self.calls.append(timeout)
        self.clock[0] += self.cost
        return self.answers.pop(0) if self.answers else []


@pyunittest.skipUnless(hasattr(select, "epoll"), "epoll is Linux-only")
class BusyPollTests(SynchronousTestCase):
    def poller(
        self, answers: List[List[Tuple[int, int]]], busyPoll: float = SPIN, awaiting: bool = True
    ) -> Tuple[KsproxyReactor, _ScriptedPoller]:
        self.addCleanup(setattr, awaitingReply, "soon", False)
        awaitingReply.soon = awaiting
        reactor = KsproxyReactor()
        self.addCleanup(reactor._poller.close)
        reactor.busyPoll = busyPoll
        clock = [1000.0]
        self.patch(reactorModule, "monotonic", lambda: clock[0])
        scripted = _ScriptedPoller(clock, answers, cost=10e-6)
        reactor._poller = scripted  # type: ignore[assignment]
        return reactor, scripted

    def test_offByDefault(self) -> None:
        self.assertEqual(KsproxyReactor.busyPoll, 0.0)
        reactor, poller = self.poller([], busyPoll=0.0)
        reactor.doPoll(1.0)
        self.assertEqual(poller.calls, [1.0])

    def test_noSpinUnlessAReplyIsAwaited(self) -> None:
        reactor, poller = self.poller([], awaiting=False)
        reactor.doPoll(1.0)
        self.assertEqual(poller.calls, [1.0])

    def test_oneSpinPerRequestSent(self) -> None:
        reactor, poller = self.poller([])
        reactor.doPoll(1.0)
        self.assertFalse(awaitingReply.soon)
        del poller.calls[:]
        reactor.doPoll(1.0)
        self.assertEqual(poller.calls, [1.0])

    def test_sendingARequestUpstreamAsksForASpin(self) -> None:
        from ksproxy.http.upstream import UpstreamConnection

        awaitingReply.soon = False
        self.addCleanup(setattr, awaitingReply, "soon", False)
        conn = UpstreamConnection(None, "k")  # type: ignore[arg-type]
        self.patch(conn, "_writeOut", lambda chunks: None)
        conn.startRequest(None, b"GET / HTTP/1.1\r\n\r\n", False)  # type: ignore[arg-type]
        self.assertTrue(awaitingReply.soon)

    def test_slowAnswersStopTheSpinning(self) -> None:
        """After SPIN_MISSES spins in a row that caught nothing, it sleeps at once, but for every
        SPIN_RETRY_EVERY-th chance, which spins again; a catch brings the spinning back."""
        reactor, poller = self.poller([])

        def chance() -> List[float]:
            awaitingReply.soon = True
            del poller.calls[:]
            reactor.doPoll(1.0)
            return list(poller.calls)

        for _ in range(SPIN_MISSES):
            self.assertGreater(len(chance()), 2)  # spun, caught nothing
        slept = [len(chance()) for _ in range(SPIN_RETRY_EVERY - 1)]
        self.assertEqual(slept, [2] * (SPIN_RETRY_EVERY - 1))  # the first look, then asleep at once
        poller.answers[:] = [[], [], [(99, select.EPOLLIN)]]
        self.assertEqual(chance(), [0, 0, 0])  # the retry spins, and catches something
        self.assertGreater(len(chance()), 2)  # so the next chance spins again

    def test_anEventWhileSpinningEndsTheSpin(self) -> None:
        reactor, poller = self.poller([[], [], [(99, select.EPOLLIN)]])
        reactor.doPoll(1.0)
        self.assertEqual(poller.calls, [0, 0, 0])  # never slept

    def test_nothingComesThenItSleepsForTheRest(self) -> None:
        reactor, poller = self.poller([])
        reactor.doPoll(1.0)
        spins, last = poller.calls[:-1], poller.calls[-1]
        self.assertEqual(set(spins), {0})
        # The first look, then the spin's polls until SPIN has passed (each costs 10 us here).
        self.assertIn(len(spins), (1 + round(SPIN / 10e-6), 2 + round(SPIN / 10e-6)))
        self.assertAlmostEqual(last, 1.0 - SPIN)

    def test_noTimerMeansSleepingWithoutTimeout(self) -> None:
        reactor, poller = self.poller([])
        reactor.doPoll(None)  # type: ignore[arg-type]
        self.assertEqual(poller.calls[-1], -1)

    def test_aShortTimeoutBoundsTheSpin(self) -> None:
        reactor, poller = self.poller([])
        reactor.doPoll(30e-6)
        self.assertLessEqual(len(poller.calls), 1 + 4 + 1)
        self.assertEqual(poller.calls[-1], 0.0)

    def test_aZeroTimeoutPollsOnce(self) -> None:
        reactor, poller = self.poller([])
        reactor.doPoll(0)
        self.assertEqual(poller.calls, [0])

    def test_underLoadOnePollATurn(self) -> None:
        """Events ready at once: the first poll returns them, nothing more is asked."""
        reactor, poller = self.poller([[(99, select.EPOLLIN)]])
        reactor.doPoll(1.0)
        self.assertEqual(poller.calls, [0])

    def test_runSetsIt(self) -> None:
        from twisted.internet.task import Clock

        from ksproxy.tap import Options, makeService

        options = Options()
        options.parseOptions(["run", "--source", "dir:/nonexistent", "--listen", "tcp:0", "--busy-poll", "250us"])
        clock: Any = Clock()
        clock.busyPoll = 0.0
        makeService(options, clock)
        self.assertAlmostEqual(clock.busyPoll, 250e-6)
