"""Starting or attaching to the Ray instance a sweep runs on, and leaving nothing behind.

`ray_session()` is the only place the sweep touches `ray.init` / `ray.shutdown`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class ClusterError(RuntimeError):
    """Ray cannot be started or reached; the message says what to do."""


def _send_token_if_there_is_one() -> None:
    """Let a client attaching to a cluster present the auth token when one exists.

    `ray start --head` turns token authentication on when a token already exists, but
    `ray.init(address=...)` only sends it with RAY_AUTH_MODE=token (Ray 2.59-2.60; see
    ray-project/ray#64755). A cluster without authentication ignores the token.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(os.path.expanduser(token_path)):
        os.environ["RAY_AUTH_MODE"] = "token"


def _ray_init(address: str | None, num_cpus: int | None, dashboard: bool, dashboard_host: str):
    # Ray reads some of these when it is imported: set them first.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("TUNE_DISABLE_DATED_SUBDIR", "1")
    # Tune's own console output would interleave with the sweep's progress; errors still
    # reach the user through the progress lines and the store.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if address:
        _send_token_if_there_is_one()

    import ray

    for name in ("ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        if address:
            return ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        # "local": always a new instance, never one that `ray start` left running.
        return ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            dashboard_host=dashboard_host,
            logging_level="ERROR",
            log_to_driver=False,
        )
    except ConnectionError as err:
        raise ClusterError(
            f"cannot reach a Ray cluster at {address!r} ({err}). Start one with "
            "`ray start --head` or leave out --address / RAY_ADDRESS to run locally."
        ) from None


@contextmanager
def ray_session(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    dashboard: bool = False,
    dashboard_host: str = "127.0.0.1",
) -> Iterator[Any]:
    """Attach to the cluster at `address` (or RAY_ADDRESS), or start a local instance; yields
    Ray's context (its `dashboard_url`) and shuts Ray down on the way out."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address and (num_cpus is not None or dashboard):
        raise ClusterError(
            "--num-cpus and --dashboard size and start a local Ray instance; "
            "they cannot apply to an existing cluster (--address / RAY_ADDRESS)"
        )
    ctx = _ray_init(address, num_cpus, dashboard, dashboard_host)
    import ray

    try:
        yield ctx
    finally:
        ray.shutdown()
