"""Tests for devicelist_plugin.core.backoff, with injected deterministic jitter."""

from __future__ import annotations

from typing import Callable

from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.core.backoff import BackoffPolicy


def constant(factor: float) -> Callable[[float, float], float]:
    def jitter(low: float, high: float) -> float:
        return factor

    return jitter


def no_jitter(low: float, high: float) -> float:
    return 1.0


def lowest(low: float, high: float) -> float:
    return low


def highest(low: float, high: float) -> float:
    return high


class DefaultsTests(SynchronousTestCase):
    def test_synapse_defaults(self) -> None:
        policy = BackoffPolicy()
        self.assertEqual(policy.min_interval, 600.0)
        self.assertEqual(policy.multiplier, 2.0)
        self.assertEqual(policy.max_interval, 604800.0)
        self.assertEqual(policy.jitter_low, 0.8)
        self.assertEqual(policy.jitter_high, 1.4)

    def test_default_schedule_without_jitter(self) -> None:
        policy = BackoffPolicy()
        self.assertEqual(
            [policy.delay(n, no_jitter) for n in range(12)],
            [
                600.0,
                1200.0,
                2400.0,
                4800.0,
                9600.0,
                19200.0,
                38400.0,
                76800.0,
                153600.0,
                307200.0,
                604800.0,  # 614400 capped at one week
                604800.0,
            ],
        )

    def test_jitter_receives_bounds(self) -> None:
        seen: list[tuple[float, float]] = []

        def record(low: float, high: float) -> float:
            seen.append((low, high))
            return 1.0

        BackoffPolicy().delay(0, record)
        BackoffPolicy(jitter_low=0.5, jitter_high=0.5).delay(3, record)
        self.assertEqual(seen, [(0.8, 1.4), (0.5, 0.5)])

    def test_jitter_scales(self) -> None:
        policy = BackoffPolicy()
        self.assertEqual(policy.delay(0, lowest), 480.0)
        self.assertEqual(policy.delay(0, highest), 840.0)
        self.assertEqual(policy.delay(2, lowest), 1920.0)
        self.assertEqual(policy.delay(2, constant(1.25)), 3000.0)

    def test_jitter_clamped_to_max(self) -> None:
        policy = BackoffPolicy()
        # 307200 * 1.4 = 430080 stays below a week
        self.assertEqual(policy.delay(9, highest), 430080.0)
        # the capped base scaled up is clamped back to the max
        self.assertEqual(policy.delay(10, highest), 604800.0)
        # ... and scaled down is not
        self.assertEqual(policy.delay(10, lowest), 604800.0 * 0.8)

    def test_huge_attempt_does_not_overflow(self) -> None:
        policy = BackoffPolicy()
        self.assertEqual(policy.delay(10_000, no_jitter), 604800.0)
        self.assertEqual(policy.delay(10**9, lowest), 604800.0 * 0.8)


class CustomPolicyTests(SynchronousTestCase):
    def test_test_network_settings(self) -> None:
        """The values ENVIRONMENT.md gives Synapse for tests: 1 s up to 10 s."""
        policy = BackoffPolicy(min_interval=1, max_interval=10)
        self.assertEqual(
            [policy.delay(n, no_jitter) for n in range(6)],
            [1.0, 2.0, 4.0, 8.0, 10.0, 10.0],
        )

    def test_multiplier(self) -> None:
        policy = BackoffPolicy(min_interval=5, multiplier=3, max_interval=1000)
        self.assertEqual(
            [policy.delay(n, no_jitter) for n in range(6)],
            [5.0, 15.0, 45.0, 135.0, 405.0, 1000.0],
        )

    def test_multiplier_one_is_constant(self) -> None:
        policy = BackoffPolicy(min_interval=30, multiplier=1, max_interval=30)
        self.assertEqual([policy.delay(n, no_jitter) for n in range(3)], [30.0] * 3)

    def test_result_is_float(self) -> None:
        self.assertIsInstance(BackoffPolicy(min_interval=1).delay(0, no_jitter), float)


class ValidationTests(SynchronousTestCase):
    def assert_rejected(self, field: str, **kwargs: object) -> None:
        with self.assertRaises(ValueError) as raised:
            BackoffPolicy(**kwargs)  # type: ignore[arg-type]
        self.assertIn(field, str(raised.exception))

    def test_min_interval(self) -> None:
        self.assert_rejected("min_interval", min_interval=0)
        self.assert_rejected("min_interval", min_interval=-1)
        self.assert_rejected("min_interval", min_interval=float("nan"))
        self.assert_rejected("min_interval", min_interval="600")

    def test_multiplier(self) -> None:
        self.assert_rejected("multiplier", multiplier=0.5)
        self.assert_rejected("multiplier", multiplier=float("inf"))
        self.assert_rejected("multiplier", multiplier=True)

    def test_max_interval(self) -> None:
        self.assert_rejected("max_interval", min_interval=10, max_interval=5)
        self.assert_rejected("max_interval", max_interval=float("inf"))

    def test_jitter_bounds(self) -> None:
        self.assert_rejected("jitter_low", jitter_low=0)
        self.assert_rejected("jitter_low", jitter_low=-0.5)
        self.assert_rejected("jitter_high", jitter_low=1.5, jitter_high=1.0)

    def test_negative_attempt(self) -> None:
        with self.assertRaises(ValueError) as raised:
            BackoffPolicy().delay(-1, no_jitter)
        self.assertIn("attempt", str(raised.exception))

    def test_bad_jitter_factor(self) -> None:
        for factor in (0.0, -1.0, float("nan"), float("inf")):
            with self.assertRaises(ValueError):
                BackoffPolicy().delay(0, constant(factor))

    def test_frozen(self) -> None:
        policy = BackoffPolicy()
        with self.assertRaises(AttributeError):
            policy.min_interval = 1  # type: ignore[misc]
