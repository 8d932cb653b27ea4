"""`umr serve --replicas N`: N serving processes over one index, one of them its writer.

Each replica binds the public port itself (SO_REUSEPORT), and only once its engine is loaded,
so the kernel spreads new connections over the replicas that can answer them (one shared socket
would hand most of them to whichever process wakes first). When a replica dies its socket dies
with it, and new connections go to the others at once: had the supervisor kept the sockets
open, a dead replica's share of new connections (a third of them with two) would wait in its
queue until the restarted one had loaded its model, 1-22 s. The supervisor only reserves the
ports, by binding them without listening: a socket that does not listen gets no connections.
The writer listens on a second, private port on 127.0.0.1 the same way, so while it is down
the replicas' relayed writes are refused at once (503, retry) instead of waiting.

Replica 0 is the writer (it holds the index's write lock and checkpoints FAISS); replicas
1..N-1 open the index read-only, memory-mapping the read-only parts (the IVF lists of a large
index, shared as page cache), follow the writer's commits (server/follower.py) and relay writes
to its private port (server/forwarding.py). A replica that dies is started again; one that keeps
dying stops the whole service rather than leave it half up.

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


def child_command(argv: list[str], *, port: int, private_port: int | None, writer_url: str | None,
                  name: str) -> list[str]:
    """The replica's command line: the supervisor's own (`argv`, without --replicas), plus the
    ports it listens on (shared with the other replicas) and its role."""
    cmd = [sys.executable, "-m", "umr", *argv, "--replica-name", name, "--port", str(port), "--reuse-port"]
    if private_port is not None:
        cmd += ["--private-port", str(private_port)]
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


def bind(host: str, port: int, shared: bool = False, listen: bool = True) -> socket.socket:
    """A TCP socket on host:port; `shared` lets the other replicas bind the same port, and one
    bound without `listen` reserves the port without taking any connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say
    # they are TCP, and with it on every small answer waited 40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


def supervise(argv: list[str], replicas: int, host: str, port: int, read_only: bool = False) -> int:
    """Run the replicas until SIGTERM/SIGINT; the exit status is 0 after a clean stop. With
    `read_only`, every replica follows a writer outside (another `umr serve`) and none writes."""
    public = bind(host, port, shared=True, listen=False)  # reserved: the replicas listen on it themselves
    private = bind("127.0.0.1", 0, shared=True, listen=False)
    port, private_port = public.getsockname()[1], private.getsockname()[1]
    writer_url = f"http://127.0.0.1:{private_port}"
    threads = max(1, (os.cpu_count() or 1) // replicas)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def start(i: int) -> subprocess.Popen:
        writes = i == 0 and not read_only
        name = "writer" if writes else f"replica-{i}"
        cmd = child_command(argv, port=port, private_port=private_port if writes else None,
                            writer_url=None if writes or read_only else writer_url, name=name)
        return subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)

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
        public.close()
        private.close()
    return status
