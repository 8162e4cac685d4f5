"""Starting or attaching to the Ray instance a sweep runs on, and leaving nothing behind.

`ray_session()` is the only place the sweep touches `ray.init` / `ray.shutdown`.

Attaching (`--address` / RAY_ADDRESS): the address is parsed and probed in a child process
before Ray sees it. `ray.init` retries an address that does not answer 20 times, 40 s each, in
C++ that holds off Ctrl+C; the probe is bounded and can be abandoned, so a wrong address fails
in seconds with one message.

Starting a local instance: everything it listens on is bound to loopback, its session folder
(Unix sockets, logs) lies in a folder only this user can enter, its token file is readable by
its owner only, and a watchdog in its own session ends the instance's processes when the
controller dies without shutting Ray down (SIGKILL, OOM): Ray's agents outlive their raylet by
about a minute otherwise, holding ports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ClusterError(RuntimeError):
    """Ray cannot be started or reached; the message says what to do."""


# --------------------------------------------------------------------------- addresses

# A connection to a host that drops packets waits this long before we call it unreachable.
TCP_TIMEOUT_S = 5.0
# Hard bound on the whole probe (start a Python, resolve, connect, ask the GCS).
PROBE_TIMEOUT_S = 25.0
# Ray's own waits inside the probe (defaults 5 s and 20 s): a port that accepts connections but
# speaks no Ray (an HTTP server, the dashboard) is told apart in about 7 s.
_PROBE_RAY_ENV = {
    "RAY_gcs_rpc_server_connect_timeout_s": "2",
    "RAY_py_gcs_connect_timeout_s": "3",
}
_GCS_PORT_HINT = "the head's GCS port, 6379 unless `ray start --head --port` set another"


@dataclass(frozen=True)
class GcsAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(address: str) -> GcsAddress | None:
    """The Ray head to attach to, or None for a new local instance ("local").

    Accepted: HOST:PORT ([IPv6]:PORT), "auto" (the cluster `ray start` last recorded on this
    machine) and "local". Refused, with what to give instead: Ray Client (ray://) and URLs.
    """
    text = address.strip()
    if text == "local":
        return None
    if text == "auto":
        return _recorded_cluster()
    if text.startswith("ray://"):
        raise ClusterError(
            f"--address {text}: Ray Client (ray://) addresses are not supported: the sweep's "
            "controller writes the store and must run on a node of the cluster. Run `sweep run` "
            f"on the head node with --address auto, or HOST:PORT ({_GCS_PORT_HINT})."
        )
    if "://" in text:
        raise ClusterError(
            f"--address {text}: expected HOST:PORT of the Ray head ({_GCS_PORT_HINT}), not a URL "
            "(the dashboard's 8265 is not a cluster address)."
        )
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ClusterError(
            f"--address {text!r}: expected HOST:PORT ({_GCS_PORT_HINT}), auto, or local"
        )
    return GcsAddress(host, int(port_text))


def _recorded_cluster() -> GcsAddress:
    """The address `ray start --head` recorded on this machine (Ray's ray_current_cluster).

    Only that record: Ray's own "auto" also attaches to any GCS process it finds, which may be
    another sweep's private instance that goes away when that sweep ends. And only a record this
    user (or root) wrote: Ray keeps it in a folder anyone can write to, and the sweep sends its
    token to the address it names.
    """
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    try:
        info = path.lstat()
        recorded = path.read_text().strip() if stat.S_ISREG(info.st_mode) else ""
    except OSError:
        recorded = ""
    if not recorded:
        raise ClusterError(
            "--address auto: no Ray cluster was started on this machine with `ray start --head` "
            f"(no {path}). Start one, give its HOST:PORT, or leave out --address / RAY_ADDRESS "
            "to run locally."
        )
    if info.st_uid not in (os.getuid(), 0):
        raise ClusterError(
            f"--address auto: {path} was written by another user (uid {info.st_uid}); give the "
            "cluster's HOST:PORT instead of trusting it with this machine's Ray token."
        )
    found = parse_address(recorded)
    if found is None:
        raise ClusterError(f"--address auto: {path} holds {recorded!r}, not HOST:PORT")
    return found


def probe(address: GcsAddress, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise ClusterError unless a Ray GCS answers at `address` (this client's token accepted).

    Runs in a child process: name resolution and Ray's C++ client can block beyond any timeout
    they are given and hold off Ctrl+C; a child can be waited for with a bound and killed, and
    Ctrl+C interrupts the wait at once.
    """
    cmd = [sys.executable, "-m", "sweeper.cluster", "probe", address.host, str(address.port)]
    env = {**os.environ, **_token_env(), **_PROBE_RAY_ENV}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ClusterError(
            f"no Ray cluster answered at {address} within {timeout_s:g} s; check the address "
            f"({_GCS_PORT_HINT}) and that this machine can reach it"
        ) from None
    if out.returncode == 0:
        return
    lines = out.stdout.strip().splitlines() or out.stderr.strip().splitlines() or ["no output"]
    raise ClusterError(lines[-1])


def _probe_child(host: str, port: int) -> int:
    """The probe's body (in the child): TCP first, for plain words; then a Ray request."""
    address = GcsAddress(host, port)
    try:
        with socket.create_connection((host, port), timeout=TCP_TIMEOUT_S):
            pass
    except socket.gaierror as err:
        print(f"cannot resolve the host of --address {address}: {err.strerror}")
        return 1
    except ConnectionRefusedError:
        print(
            f"nothing listens at {address} (connection refused). Start the cluster with "
            f"`ray start --head --port={port}`, check the port ({_GCS_PORT_HINT}), or leave out "
            "--address / RAY_ADDRESS to run locally."
        )
        return 1
    except TimeoutError:
        print(
            f"{address} did not answer within {TCP_TIMEOUT_S:g} s: the host is down or "
            "unreachable from here, or a firewall drops the connection"
        )
        return 1
    except OSError as err:
        print(f"cannot reach {address}: {err.strerror or err}")
        return 1

    # Ray's C++ client logs its retries to stderr; the parent shows only our line.
    from ray._raylet import GcsClient

    try:
        client = GcsClient(address=str(address))
        # Any request through the client: a cluster with token authentication checks it here.
        client.internal_kv_get(b"sweeper-probe", None, timeout=5)
    except Exception as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Timed out while waiting for GCS" in text:
            print(
                f"{address} accepts connections but no Ray cluster answers there. Give "
                f"{_GCS_PORT_HINT}; the dashboard (8265) and Ray Client (10001) ports are not it."
            )
        elif type(err).__name__ == "AuthenticationError":
            print(
                f"the Ray cluster at {address} uses token authentication and refused this "
                f"client, which {_token_source()}. Give this machine the cluster's token "
                "(`ray get-auth-token` on the head prints it) in ~/.ray/auth_token, "
                "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN."
            )
        else:
            print(f"no Ray cluster answers at {address}: {text}")
        return 1
    return 0


# --------------------------------------------------------------------------- token file


def _token_path() -> Path:
    custom = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(custom).expanduser() if custom else Path.home() / ".ray" / "auth_token"


def ensure_private_token() -> Path | None:
    """Make sure the token a new local instance uses is readable by its owner only.

    Ray 2.60 writes ~/.ray/auth_token with the umask (0644 usually): any local user could read
    it and act on the cluster. Writing it first with 0600 leaves no window; an existing one we
    own is narrowed. Returns the file, or None when there is none to guard (token in
    RAY_AUTH_TOKEN, or authentication disabled by the user).
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or os.environ.get(
        "RAY_AUTH_TOKEN"
    ):
        return None
    path = _token_path()
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another process was first: narrow theirs
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))  # what Ray generates: 256 random bits
    info = path.stat()
    if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o600)
    return path


def _token_source() -> str:
    """Which token this process sends, in words (for an authentication error)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return "sent no token"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "sent the token in RAY_AUTH_TOKEN"
    return f"sent the token in {_token_path()}"


def _token_env() -> dict[str, str]:
    """The environment that lets a client attaching to a cluster present the auth token.

    `ray start --head` turns token authentication on when a token already exists, but
    `ray.init(address=...)` only sends it with RAY_AUTH_MODE=token (Ray 2.59-2.60; see
    ray-project/ray#64755). A cluster without authentication ignores the token.
    """
    if "RAY_AUTH_MODE" not in os.environ and (
        os.environ.get("RAY_AUTH_TOKEN") or _token_path().exists()
    ):
        return {"RAY_AUTH_MODE": "token"}
    return {}


# --------------------------------------------------------------------------- session folder


def private_temp_dir() -> Path:
    """Where a local instance keeps its session (Unix sockets, logs, spilled objects).

    Ray makes its folders writable by everyone (/tmp/ray and each session in it: 0777), so any
    user of the machine could reach the raylet's and the object store's Unix sockets, or swap
    the record `--address auto` reads. Ray's folder goes inside one only this user can enter
    (0700): Ray's chmod does not reach above it.
    """
    from ray._common.utils import get_default_system_temp_dir

    base = Path(get_default_system_temp_dir())
    mine = base / f"sweeper-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        mine.mkdir(mode=0o700)
    info = mine.lstat()
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.getuid()
        or stat.S_IMODE(info.st_mode) & 0o077
    ):  # a link, someone else's, or opened up: a fresh one of our own instead
        mine = Path(tempfile.mkdtemp(prefix=f"sweeper-{os.getuid()}-", dir=base))
    return mine / "ray"


# --------------------------------------------------------------------------- loopback


@contextmanager
def _loopback_only() -> Iterator[None]:
    """Bind everything a new local instance serves to 127.0.0.1.

    Ray binds its gRPC servers (GCS, raylet, workers) to 0.0.0.0 and its Prometheus /metrics
    endpoints (unauthenticated) to the node IP, unless the node IP is loopback. Ray picks
    loopback as the node IP where clusters are turned off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
    the macOS and Windows default); its agents read the variable on import, so it goes to
    them through the environment, and to this process's copy of the constant too, in case
    Ray was imported before. Restored afterwards: a later attach in this process needs the
    machine's real IP.
    """
    import ray._private.ray_constants as ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_flag = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env


# --------------------------------------------------------------------------- watchdog

# Set in the environment of the processes a local instance starts during `ray.init` (Ray passes
# it on to the workers it starts later): the watchdog ends the processes carrying its random
# value. Ray's agents rewrite their process title over their environment (setproctitle), so they
# are recognised instead by the log files they write in the instance's session directory.
MARKER_VAR = "SWEEPER_RAY_SESSION"
# After the controller is gone: SIGTERM, this long to exit, then SIGKILL (agents stuck on a
# dead GCS ignore SIGTERM); give up after the deadline rather than spin forever.
_TERM_GRACE_S = 2.0
_SWEEP_DEADLINE_S = 30.0


def _writes_under(pid: int, folder: str) -> bool:
    """Whether the process holds a file under `folder` open for writing.

    Writing, not reading: a user's `tail -f` on the instance's logs is not part of it.
    """
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            if not os.readlink(fd).startswith(folder + "/"):
                continue
            flags = (fd_dir.parent / "fdinfo" / fd.name).read_text().split("flags:")[1].split()[0]
        except (OSError, IndexError):
            continue
        if (int(flags, 8) & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR):
            return True
    return False


def instance_processes(
    marker: str, session_dirs: tuple[str, ...] = (), spare: frozenset[int] = frozenset()
) -> list[int]:
    """Live processes of this user that belong to the marked instance (Linux /proc): those
    whose environment carries MARKER_VAR=marker, or that write into one of `session_dirs`,
    except `spare` (the controller: its driver writes logs there too)."""
    needle = f"{MARKER_VAR}={marker}".encode()
    spare, uid, found = spare | {os.getpid()}, os.getuid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spare:
            continue
        pid = int(entry.name)
        try:
            if entry.stat().st_uid != uid:
                continue
            environ = (entry / "environ").read_bytes()
            if not environ:  # a zombie (already dead) or a kernel thread
                continue
            if needle in environ.split(b"\0") or any(_writes_under(pid, d) for d in session_dirs):
                found.append(pid)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def end_instance(
    marker: str,
    session_dirs: tuple[str, ...] = (),
    spare: frozenset[int] = frozenset(),
    deadline_s: float = _SWEEP_DEADLINE_S,
) -> int:
    """SIGTERM, then SIGKILL, the instance's processes until none is left; returns how many."""
    signalled: set[int] = set()
    give_up = time.monotonic() + deadline_s
    while time.monotonic() < give_up:
        pids = instance_processes(marker, session_dirs, spare)
        if not pids:
            break
        for pid in pids:
            # Signalled before and still here after its grace: it ignored SIGTERM.
            sig = signal.SIGKILL if pid in signalled else signal.SIGTERM
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
            signalled.add(pid)
        time.sleep(_TERM_GRACE_S)
    return len(signalled)


def _watchdog_child(controller: int, pipe_fd: int, marker: str) -> int:
    """Wait until the controller dies or closes its end of the pipe, then end the instance.

    The controller writes the instance's session directory into the pipe once Ray is up.
    """
    try:
        # Readable when the process exits; unlike its pid it cannot be reused meanwhile.
        exited: int | None = os.pidfd_open(controller)
    except (AttributeError, OSError):
        # Gone already, or no pidfd: the pipe alone, closed when the controller dies.
        exited = None
    waits = [pipe_fd] if exited is None else [pipe_fd, exited]
    received = b""
    while True:
        ready, _, _ = select.select(waits, [], [])
        if pipe_fd in ready:
            chunk = os.read(pipe_fd, 4096)
            if not chunk:  # closed: Ray shut down, or the controller died
                break
            received += chunk
        else:  # the controller died, though a process it forked still holds the pipe open
            os.set_blocking(pipe_fd, False)
            with contextlib.suppress(BlockingIOError):
                received += os.read(pipe_fd, 4096)
            break
    session_dirs = tuple(line for line in received.decode().splitlines() if line)
    # After a clean shutdown the controller lives on, its driver's logs still open in there.
    end_instance(marker, session_dirs, spare=frozenset({controller}))
    return 0


@dataclass
class _Watchdog:
    process: subprocess.Popen
    pipe_fd: int  # our end: the session directory goes in; closing it means "shut down"
    marker: str

    @classmethod
    def start(cls) -> _Watchdog | None:
        if not Path("/proc").is_dir():  # it finds the processes through /proc (Linux)
            return None
        marker = f"{os.getpid()}-{secrets.token_hex(8)}"
        read_fd, pipe_fd = os.pipe()  # both close-on-exec: Ray's processes do not hold them
        env = {k: v for k, v in os.environ.items() if k != MARKER_VAR}
        cmd = [sys.executable, "-m", "sweeper.cluster", "watchdog"]
        process = subprocess.Popen(
            [*cmd, str(os.getpid()), str(read_fd), marker],
            pass_fds=(read_fd,),
            env=env,
            # Its own session: Ctrl+C in the terminal and signals to our process group miss it.
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            # Not our stdout/stderr: a caller reading them to EOF would wait for it.
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(read_fd)
        return cls(process, pipe_fd, marker)

    @contextmanager
    def marking(self) -> Iterator[None]:
        """Processes started meanwhile (Ray's, and those they start) carry the marker."""
        os.environ[MARKER_VAR] = self.marker
        try:
            yield
        finally:
            os.environ.pop(MARKER_VAR, None)

    def watch(self, session_dir: str) -> None:
        os.write(self.pipe_fd, os.path.realpath(session_dir).encode() + b"\n")

    def release(self) -> None:
        """Ray is shut down: let the watchdog end any straggler and exit."""
        os.close(self.pipe_fd)


# --------------------------------------------------------------------------- sessions


def _prepare_environment() -> None:
    # Ray reads some of these when it is imported: set them first.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("TUNE_DISABLE_DATED_SUBDIR", "1")
    # Tune's own console output would interleave with the sweep's progress; errors still
    # reach the user through the progress lines and the store.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in ("ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _attach(address: GcsAddress, probe_timeout_s: float) -> Any:
    probe(address, probe_timeout_s)
    import ray

    if _token_env():
        # Ray reads the mode into its config when first imported, maybe before this point
        # ("auto" reads Ray's record): set it the way Ray's own ray.init() does, with a refresh.
        from ray._private.authentication import authentication_token_setup

        authentication_token_setup._enable_token_auth()

    try:
        return ray.init(address=str(address), logging_level="ERROR", log_to_driver=False)
    except Exception as err:  # it answered the probe a moment ago: say what Ray says now
        raise ClusterError(f"cannot attach to the Ray cluster at {address}: {err}") from None


@contextmanager
def _local_instance(num_cpus: int | None, dashboard: bool, dashboard_host: str) -> Iterator[Any]:
    import ray

    ensure_private_token()
    watchdog = _Watchdog.start()
    try:
        with _loopback_only():
            with watchdog.marking() if watchdog else contextlib.nullcontext():
                # "local": always a new instance, never one that `ray start` left running.
                ctx = ray.init(
                    address="local",
                    num_cpus=num_cpus,
                    include_dashboard=dashboard,
                    dashboard_host=dashboard_host,
                    _node_ip_address="127.0.0.1",
                    _temp_dir=str(private_temp_dir()),
                    logging_level="ERROR",
                    log_to_driver=False,
                )
            if watchdog:
                watchdog.watch(ctx.address_info["session_dir"])
            ensure_private_token()  # in case Ray wrote one where we did not look
            try:
                yield ctx
            finally:
                ray.shutdown()
    finally:
        if watchdog:
            watchdog.release()


@contextmanager
def ray_session(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    dashboard: bool = False,
    dashboard_host: str = "127.0.0.1",
    probe_timeout_s: float = PROBE_TIMEOUT_S,
) -> Iterator[Any]:
    """Attach to the cluster at `address` (or RAY_ADDRESS), or start a local instance; yields
    Ray's context (its `dashboard_url`) and shuts Ray down on the way out.

    An address is probed first: ClusterError within `probe_timeout_s` when no cluster answers.
    """
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip() or None
    _prepare_environment()
    target = parse_address(address) if address else None
    if target is not None and (num_cpus is not None or dashboard):
        raise ClusterError(
            "--num-cpus and --dashboard size and start a local Ray instance; "
            "they cannot apply to an existing cluster (--address / RAY_ADDRESS)"
        )
    if target is None:
        with _local_instance(num_cpus, dashboard, dashboard_host) as ctx:
            yield ctx
        return
    ctx = _attach(target, probe_timeout_s)
    import ray

    try:
        yield ctx
    finally:
        ray.shutdown()


def _main(argv: list[str]) -> int:
    """`python -m sweeper.cluster probe HOST PORT` | `watchdog PID FD MARKER` (children)."""
    if argv[:1] == ["probe"] and len(argv) == 3:
        return _probe_child(argv[1], int(argv[2]))
    if argv[:1] == ["watchdog"] and len(argv) == 4:
        return _watchdog_child(int(argv[1]), int(argv[2]), argv[3])
    print(_main.__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
