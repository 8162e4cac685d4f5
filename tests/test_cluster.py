"""Attaching to a cluster fails fast and can be interrupted; a local Ray instance listens on
loopback only, keeps its token private, and does not outlive a killed controller (issue 12)."""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import yaml

from sweeper.cluster import (
    MARKER_VAR,
    ClusterError,
    GcsAddress,
    end_instance,
    ensure_private_token,
    parse_address,
    probe,
)

BIN = Path(sys.executable).parent
# A wrong --address must give its error within this (issue 12, item 2).
ERROR_WITHIN_S = 30
TINY = {
    "name": "tiny",
    "model": {"kind": "gpt", "depth": 1, "seq_len": 32, "head_dim": 16},
    "train": {"steps": 6, "log_every": 2, "eval_every": 3, "eval_batches": 1},
    "grid": {"width": [32], "batch_size": [4], "optimizer": {"adamw": {"lr": [1e-3]}}},
    "resources": {"cpu": 1},
}
# One trial that keeps training for the whole test: the instance is up while we look at it.
SLOW = {**TINY, "train": {"steps": 1_000_000, "log_every": 1000, "eval_every": 1_000_000}}


def write_grid(tmp_path: Path, grid: dict) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**grid, "results": str(tmp_path / "results")}))
    return path


# --------------------------------------------------------------------------- /proc helpers


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces): state, ppid, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _address(hex_addr: str) -> tuple[str, int]:
    """A /proc/net/{tcp,udp}[6] address: little-endian 32-bit words, then the port."""
    host, port = hex_addr.split(":")
    raw = b"".join(bytes.fromhex(host[i : i + 8])[::-1] for i in range(0, len(host), 8))
    return str(ipaddress.ip_address(raw)), int(port, 16)


def listening_sockets(pids: set[int]) -> dict[tuple[str, str, int], int]:
    """(protocol, address, port) -> pid for every TCP socket listening, or UDP socket bound,
    that one of `pids` holds."""
    inodes: dict[str, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        inodes[link[8:-1]] = pid
    found = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                # TCP: LISTEN (0A); UDP: any bound socket (07) receives datagrams
                if inode in inodes and state == ("0A" if proto.startswith("tcp") else "07"):
                    found[(proto[:3], *_address(local))] = inodes[inode]
    return found


def is_loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host)
    mapped = getattr(ip, "ipv4_mapped", None)  # [::ffff:127.0.0.1] is loopback too
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def outward_ip() -> str | None:
    """This machine's address towards the network (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("203.0.113.1", 9))  # TEST-NET-3: only the route is looked up
        except OSError:
            return None
        ip = s.getsockname()[0]
    return None if ipaddress.ip_address(ip).is_loopback else ip


def wait_gone(pids: set[int], within_s: float) -> set[int]:
    deadline = time.monotonic() + within_s
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _default_sigint() -> None:
    # A shell that starts us in the background ignores SIGINT for us, and children inherit
    # that: give the child the disposition a terminal's Ctrl+C meets.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_sweep(*args: str, log: IO[str] | None = None, **env: str) -> subprocess.Popen:
    """`sweep run ARGS` in the background; its output goes to `log`, else to pipes."""
    return subprocess.Popen(
        [str(BIN / "sweep"), "run", *args],
        stdout=log or subprocess.PIPE,
        stderr=log or subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "200", **env},
        start_new_session=True,  # its own group, as a terminal's job: ended with killpg
        preexec_fn=_default_sigint,
    )


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:6379", GcsAddress("127.0.0.1", 6379)),
        (" head.example:1234 ", GcsAddress("head.example", 1234)),
        ("[::1]:6379", GcsAddress("::1", 6379)),
        ("local", None),
    ],
)
def test_addresses_that_name_a_head_or_a_local_instance(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("ray://head:10001", "Ray Client (ray://) addresses are not supported"),
        ("http://127.0.0.1:8265", "not a URL"),
        ("head", "expected HOST:PORT"),
        ("head:port", "expected HOST:PORT"),
        ("head:70000", "expected HOST:PORT"),
        (":6379", "expected HOST:PORT"),
    ],
)
def test_addresses_of_other_kinds_are_refused_with_what_to_give(text, words):
    with pytest.raises(ClusterError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_address(text)


def test_auto_means_the_cluster_ray_start_recorded_by_this_user(tmp_path, monkeypatch):
    import ray._common.utils

    record = tmp_path / "ray_current_cluster"
    monkeypatch.setattr(ray._common.utils, "get_ray_address_file", lambda _: str(record))
    with pytest.raises(ClusterError, match="no Ray cluster was started on this machine"):
        parse_address("auto")
    record.write_text("10.0.0.5:6379\n")
    assert parse_address("auto") == GcsAddress("10.0.0.5", 6379)
    try:  # Ray keeps the record in a folder anyone may write to: another user's is refused
        os.chown(record, 65534, 65534)
    except PermissionError:
        pytest.skip("only root can hand a file to another user")
    with pytest.raises(ClusterError, match="written by another user"):
        parse_address("auto")


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free again once closed: nothing listens there


class _WebServer(http.server.ThreadingHTTPServer):
    """A web server (`python -m http.server`): accepts connections, speaks no Ray."""

    def __init__(self) -> None:
        self.asked = threading.Event()  # set on the first request: a client is connecting
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def handle_one_request(self) -> None:
                server.asked.set()
                super().handle_one_request()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def web_server() -> Iterator[_WebServer]:
    server = _WebServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def http_port(web_server: _WebServer) -> int:
    return web_server.server_address[1]


@pytest.fixture
def black_hole_port() -> Iterator[int]:
    """A port that drops connection attempts, as an unroutable host or a firewall does.

    A listening socket whose accept queue is full: Linux drops further SYNs, so a connect
    waits for its timeout (a real unroutable address would depend on the network).
    """
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):  # fills the queue
            yield port


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("closed", "nothing listens at"),
        ("http", "accepts connections but no Ray cluster answers there"),
        ("black_hole", "did not answer within 5 s"),
    ],
    ids=["closed", "http", "black_hole"],
)
def test_run_with_an_address_where_no_cluster_answers_fails_fast_with_one_message(
    tmp_path, sweep_cli, request, kind, words
):
    port = request.getfixturevalue(f"{kind}_port")
    started = time.monotonic()
    out = sweep_cli("run", str(write_grid(tmp_path, TINY)), "--address", f"127.0.0.1:{port}")
    took = time.monotonic() - started
    assert out.returncode == 2, out.stderr
    assert took < ERROR_WITHIN_S, f"{kind}: {took:.1f} s"
    assert words in out.stderr and "error:" in out.stderr
    assert "Traceback" not in out.stderr and "rpc_client" not in out.stderr
    assert not list((tmp_path / "results").glob("*/trials/*.parquet"))


def test_ctrl_c_while_connecting_exits_130_at_once(tmp_path, web_server):
    """Connecting to a web server's port takes seconds; Ctrl+C in the middle ends the run.

    (Ray's own client held Ctrl+C off for up to 40 s.)
    """
    port = web_server.server_address[1]
    proc = start_sweep(str(write_grid(tmp_path, TINY)), "--address", f"127.0.0.1:{port}")
    try:
        # Connecting from the first request on (Ray's own client may try another address
        # of this machine than the server's, which gives no request: 20 s is then well in).
        web_server.asked.wait(timeout=20)
        time.sleep(1)
        assert proc.poll() is None, "the attempt should take longer than that"
        probes = [p for p in descendants(proc.pid) if "sweeper.cluster probe" in cmdline(p)]
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl+C does
        sent = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
        assert took < 5, f"Ctrl+C took {took:.1f} s"
        assert proc.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
        assert not [p for p in probes if alive(p)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.ray
def test_a_real_cluster_still_answers_the_probe_and_attaches(ray_address, monkeypatch):
    from sweeper.cluster import ray_session

    # Attaching sets RAY_AUTH_MODE in this process to send the token: recorded as unset
    # first (setenv), so that the teardown removes it again.
    monkeypatch.setenv("RAY_AUTH_MODE", "")
    monkeypatch.delenv("RAY_AUTH_MODE")
    started = time.monotonic()
    probe(parse_address(ray_address))
    assert time.monotonic() - started < 15
    with ray_session(ray_address) as ctx:
        import ray

        assert ctx.address_info["gcs_address"].endswith(ray_address.rsplit(":", 1)[1])
        assert ray.cluster_resources()["CPU"] >= 1


# --------------------------------------------------------------------------- token file


def test_a_new_token_file_is_readable_by_its_owner_only(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    path = ensure_private_token()
    assert path == tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text()) == 64 and int(path.read_text(), 16) >= 0
    assert ensure_private_token() == path and len(path.read_text()) == 64  # kept, not replaced


def test_an_existing_world_readable_token_is_narrowed_and_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    token = tmp_path / "token"
    token.write_text("a" * 64)
    token.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert ensure_private_token() == token
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == "a" * 64


def test_no_token_file_when_authentication_is_off_or_the_token_is_in_the_environment(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ensure_private_token() is None
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "b" * 64)
    assert ensure_private_token() is None
    assert not (tmp_path / ".ray").exists()


# --------------------------------------------------------------------------- leftovers


def test_only_marked_processes_and_writers_of_the_session_folder_are_ended(tmp_path):
    session = tmp_path / "session_x"
    (session / "logs").mkdir(parents=True)
    (session / "logs" / "agent.log").write_text("")
    marker = f"test-{os.getpid()}"
    sleep = ["sleep", "300"]
    marked = subprocess.Popen(sleep, env={**os.environ, MARKER_VAR: marker})
    other_marker = subprocess.Popen(sleep, env={**os.environ, MARKER_VAR: marker + "-other"})
    # an agent that rewrote its environment is still known by the log it writes
    writer = subprocess.Popen(["sh", "-c", f"exec sleep 300 >> {session}/logs/agent.log"])
    # a user reading the logs is not part of the instance
    reader = subprocess.Popen(["sh", "-c", f"exec sleep 300 < {session}/logs/agent.log"])
    procs = [marked, other_marker, writer, reader]
    try:
        time.sleep(0.3)  # the shells have exec'd with their redirections
        assert end_instance(marker, (str(session),), deadline_s=10) == 2
        for p in (marked, writer):
            assert p.wait(timeout=5) == -signal.SIGTERM
        assert other_marker.poll() is None and reader.poll() is None
    finally:
        for p in procs:
            p.kill()
            p.wait()


CONTROLLER = """
import subprocess, sys, time
from sweeper.cluster import _Watchdog
watchdog = _Watchdog.start()
with watchdog.marking():
    # stands for Ray's processes: started while marking, ignoring SIGTERM like Ray's agents
    child = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 300 & wait"])
print(child.pid, watchdog.process.pid, flush=True)
time.sleep(300)
"""


def test_watchdog_ends_what_the_controller_started_once_it_is_killed():
    controller = subprocess.Popen(
        [sys.executable, "-c", CONTROLLER], stdout=subprocess.PIPE, text=True
    )
    child, watchdog = map(int, controller.stdout.readline().split())
    deadline = time.monotonic() + 10
    while not (grandchild := descendants(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert alive(child) and alive(watchdog) and grandchild
        controller.kill()
        controller.wait()
        # SIGTERM ignored: SIGKILL after the 2 s grace
        assert not wait_gone({child, watchdog, *grandchild}, within_s=15)
    finally:
        for pid in (child, *grandchild, watchdog):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def local_sweep(tmp_path: Path, **env: str) -> Iterator[tuple[subprocess.Popen, set[int]]]:
    """`sweep run` on its own local Ray instance, with one trial training; yields the process
    and its descendants (Ray's processes and the trial's worker among them)."""
    # to a file: a pipe nobody reads during the test could fill up and stall the run
    log = (tmp_path / "sweep.log").open("w")
    proc = start_sweep(str(write_grid(tmp_path, SLOW)), "--num-cpus", "1", log=log, **env)
    pids: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            pids = descendants(proc.pid)
            if any(comm(p).startswith("ray::Implicit") for p in pids):  # Tune's trial actor
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no trial started: {proc.poll()=}")
        time.sleep(2)  # agents and metrics servers settle
        yield proc, descendants(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        # a failed test must not leave its instance behind: these are processes it started
        for pid in wait_gone(pids | descendants(proc.pid), within_s=30):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _private_ancestor(path: Path) -> Path | None:
    """The nearest folder above `path` that only its owner (this user) can enter."""
    for folder in path.parents:
        info = folder.stat()
        if info.st_uid == os.getuid() and not stat.S_IMODE(info.st_mode) & 0o077:
            return folder
    return None


@pytest.mark.ray
def test_local_instance_listens_on_loopback_only_and_keeps_token_and_sockets_private(tmp_path):
    home = tmp_path / "home"  # a user who never ran Ray: the token is created by this run
    home.mkdir()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    with local_sweep(tmp_path, HOME=str(home), XDG_CACHE_HOME=cache) as (proc, pids):
        sockets = listening_sockets(pids)
        assert len(sockets) >= 4, sockets  # GCS, raylet (2), workers, agents, metrics
        exposed = [(s, comm(pid)) for s, pid in sockets.items() if not is_loopback(s[1])]
        assert not exposed, exposed
        if ip := outward_ip():  # and nothing answers on the machine's address
            for _, _, port in sockets:
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection((ip, port), timeout=2).close()
        token = home / ".ray" / "auth_token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        # Ray's Unix sockets (raylet, object store) lie in a folder others cannot enter
        (raylet,) = [p for p in pids if comm(p) == "raylet"]
        flag = "--raylet_socket_name="
        (socket_path,) = [a[len(flag) :] for a in cmdline(raylet).split() if a.startswith(flag)]
        assert _private_ancestor(Path(socket_path)), socket_path

        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130, (tmp_path / "sweep.log").read_text()
        assert not wait_gone(pids, within_s=30), "a clean stop leaves nothing either"


@pytest.mark.ray
def test_killed_controller_leaves_no_ray_process_and_spares_other_clusters(tmp_path, ray_address):
    with local_sweep(tmp_path) as (proc, pids):
        ray_pids = {p for p in pids if comm(p) in ("gcs_server", "raylet")}
        assert len(ray_pids) == 2, [comm(p) for p in pids]
        os.kill(proc.pid, signal.SIGKILL)  # the controller only, as the OOM killer would
        proc.wait()
        left = wait_gone(pids, within_s=60)
        assert not left, [(p, comm(p)) for p in left]
    probe(parse_address(ray_address))  # the cluster the sweep did not start still answers
