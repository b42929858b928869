"""Servers on 127.0.0.1 for tests: a port that refuses connections, and an environment without proxies, so
that requests to 127.0.0.1 go straight to the server whatever the user's environment says."""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest


def clear_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every proxy setting (http_proxy, HTTPS_PROXY, all_proxy, no_proxy, ...: any *_proxy in any case,
    which is what urllib and curl read) from this test's environment, so that requests to a server on
    127.0.0.1 go straight to it whatever the user's environment says. Child processes inherit the change.
    urlopen's global opener keeps the proxies of the environment it was first used in (perhaps by an earlier
    test in this process): it is dropped too, so the next urlopen builds one from the cleared environment."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(urllib.request, "_opener", None)


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections for as long as it is held: bound but not listening, so no
    other process can bind it (a port merely found free a moment ago could be taken and answer)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]
