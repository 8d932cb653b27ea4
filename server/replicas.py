"""`umr serve --replicas N`: N serving processes over one index, one of them its writer.

The supervisor (this process) binds the public port once per replica (SO_REUSEPORT), so the
kernel spreads new connections evenly over the replicas (one shared socket would hand most of
them to whichever process wakes first), and keeps the sockets open: connections that arrive
while a replica restarts wait in its queue. It binds a second, private port on 127.0.0.1 that
only the writer listens on. Replica 0 is the writer (it holds the index's
write lock and checkpoints FAISS); replicas 1..N-1 open the index read-only, memory-mapping
the read-only parts (the IVF lists of a large index, shared as page cache), follow the
writer's commits (server/follower.py) and relay writes to its private port
(server/forwarding.py). A replica that dies is started again; one that keeps dying stops the
whole service rather than leave it half up.

Each replica gets cores / N threads for its encoder and FAISS, so N replicas do not fight
over the cores the way N copies of one process each using every core would.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

RESTARTS_ALLOWED = 5  # within RESTART_WINDOW_S; beyond that the service stops
RESTART_WINDOW_S = 60.0
STOP_GRACE_S = 30.0


def child_command(argv: list[str], fds: list[int], *, writer_url: str | None, name: str) -> list[str]:
    """The replica's command line: the supervisor's own (`argv`, without --replicas), plus the
    sockets it listens on and its role."""
    cmd = [sys.executable, "-m", "umr", *argv, "--replica-name", name]
    for fd in fds:
        cmd += ["--listen-fd", str(fd)]
    if writer_url:
        cmd += ["--read-only", "--writer-url", writer_url]
    return cmd


def _die_with_parent() -> None:
    """In the replica, before it runs: SIGTERM it when the supervisor dies, however it dies
    (a SIGKILL of the supervisor must not leave replicas holding the port and the write lock)."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: replicas outlive a killed supervisor until stopped


def bind(host: str, port: int, shared: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def supervise(argv: list[str], replicas: int, host: str, port: int, read_only: bool = False) -> int:
    """Run the replicas until SIGTERM/SIGINT; the exit status is 0 after a clean stop. With
    `read_only`, every replica follows a writer outside (another `umr serve`) and none writes."""
    first = bind(host, port, shared=True)
    public = [first] + [bind(host, first.getsockname()[1], shared=True) for _ in range(replicas - 1)]
    private = bind("127.0.0.1", 0)
    writer_url = f"http://127.0.0.1:{private.getsockname()[1]}"
    threads = max(1, (os.cpu_count() or 1) // replicas)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def start(i: int) -> subprocess.Popen:
        writes = i == 0 and not read_only
        fds = [public[i].fileno(), private.fileno()] if writes else [public[i].fileno()]
        name = "writer" if writes else f"replica-{i}"
        cmd = child_command(argv, fds, writer_url=None if writes or read_only else writer_url, name=name)
        return subprocess.Popen(cmd, pass_fds=fds, env=env, preexec_fn=_die_with_parent)

    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    roles = (f"{replicas} read-only replicas following the index's writer elsewhere" if read_only else
             f"the writer and {replicas - 1} read-only replica(s) relaying writes to it at {writer_url}")
    print(f"serving with {replicas} replicas on http://{host}:{port}: {roles}, {threads} thread(s) each", flush=True)
    procs = {i: start(i) for i in range(replicas)}
    restarts: list[float] = []
    status = 0
    try:
        while not stopping:
            time.sleep(0.2)
            for i, proc in list(procs.items()):
                code = proc.poll()
                if code is None or stopping:
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < RESTART_WINDOW_S] + [now]
                if len(restarts) > RESTARTS_ALLOWED:
                    print(f"umr: error: replicas exited {len(restarts)} times within {RESTART_WINDOW_S:.0f} s "
                          f"(last: {'the writer' if i == 0 else f'replica {i}'}, status {code}); stopping",
                          file=sys.stderr, flush=True)
                    stopping, status = True, 1
                    break
                print(f"{'the writer' if i == 0 else f'replica {i}'} exited with status {code}; starting it again",
                      file=sys.stderr, flush=True)
                procs[i] = start(i)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for sock in [*public, private]:
            sock.close()
    return status
