"""Test-session setup that must happen before Ray is imported anywhere.

Ray reads its auth mode once per process, when its core library loads. Every Ray cluster the
tests start (local `ray.init()` or `ray start` clusters in tests/faults.py) uses token auth,
as Ray 2.60 does by default, with one token for the session, so this process can talk to all
of them.
"""

import os
import secrets

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))

# Cluster profiles (autotune/study/cluster_profile.py) are cached for this test run only, shared by
# its workers, never in the user's own cache.
import tempfile  # noqa: E402

os.environ.setdefault("AUTOTUNE_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"autotune-tests-{os.environ.get('PYTEST_XDIST_TESTRUNUID') or os.getpid()}"))


# ---------------------------------------------------------------------------------------------
# Running on two workers (`make test`: pytest-xdist), then alone.

import functools  # noqa: E402
from pathlib import Path  # noqa: E402


TESTS = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _shares_scope(text: str, *scopes: str) -> bool:
    return any(f'scope="{s}"' in text or f"scope='{s}'" in text for s in scopes)


def work_unit(nodeid: str) -> str:
    """What one worker runs as a whole: the package of a package-scoped fixture (tests/ui: one
    quick-start study, one browser), the module of a module- or class-scoped one (a study run
    once, a stack of services whose tests follow each other), else the test alone."""
    module = nodeid.split("::")[0]
    path = TESTS.parent / module
    folder = path.parent
    while folder == TESTS or TESTS in folder.parents:
        if _shares_scope(_text(folder / "conftest.py"), "package") and folder != TESTS:
            return str(folder.relative_to(TESTS.parent))
        folder = folder.parent
    if _shares_scope(_text(path), "module", "class", "package"):
        return module
    return nodeid


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's loadscope with `work_unit` as the scope (its loadgroup marks do not reach the
    scheduler under pytest 9.2, whose node ids can no longer be rewritten)."""
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return WorkUnits(config, log)


def pytest_collection_modifyitems(config, items):
    """On the workers, the long work first: the work units that share a fixture (a study, a stack
    of services) and the slow tests, whole modules kept together, so that no worker is left alone
    with a long test at the end; a plain run keeps the collection order."""
    import os

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    long = {item.nodeid.split("::")[0] for item in items
            if item.get_closest_marker("slow") or work_unit(item.nodeid) != item.nodeid}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in long)
