"""Test setup: 8 simulated CPU devices (set before any backend initialises), a persistent compile cache, and CI's
refusal of skipped parity / slow tests."""

import importlib.util
import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax

jax.config.update("jax_num_cpu_devices", 8)


# --------------------------------------------------------------------------------------------------------- #
# CI refuses skipped parity / slow tests. .ci/run sets DFLASH_JAX_REQUIRE_ALL_TESTS=1; when the parity extra is
# installed, a skipped test marked ``parity`` or ``slow`` and a test module skipped as a whole (an importorskip at
# import time hides its markers) fail the session, listed with their skip reasons.
_REQUIRED_MARKERS = ("parity", "slow")
_PARITY_EXTRA = ("torch", "transformers", "modelopt")
_forbidden_skips: list[str] = []


def _enforced() -> bool:
    return os.environ.get("DFLASH_JAX_REQUIRE_ALL_TESTS") == "1" and all(
        importlib.util.find_spec(m) is not None for m in _PARITY_EXTRA
    )


def _reason(report) -> str:
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


def pytest_collectreport(report):
    if report.skipped and _enforced():
        _forbidden_skips.append(f"{report.nodeid} (whole module): {_reason(report)}")


def pytest_runtest_logreport(report):
    if report.skipped and _enforced() and any(m in report.keywords for m in _REQUIRED_MARKERS):
        _forbidden_skips.append(f"{report.nodeid}: {_reason(report)}")


def pytest_sessionfinish(session, exitstatus):
    if _forbidden_skips:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _forbidden_skips:
        terminalreporter.section("skipped parity / slow tests (DFLASH_JAX_REQUIRE_ALL_TESTS=1)", red=True)
        for line in _forbidden_skips:
            terminalreporter.line(line)
