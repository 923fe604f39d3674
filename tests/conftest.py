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
