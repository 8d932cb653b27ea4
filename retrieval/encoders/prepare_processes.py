"""Image preparation in forked worker processes: what lets a build's decoding scale with the cores.

Threads stop scaling early: opening a file, parsing its JPEG markers, reading EXIF and
dispatching the resize hold the GIL for a good part of each image, so two threads on two cores
prepared 1.5-1.6x what one did, and sixteen could not feed a GPU. Processes share no GIL. They
are forked, so they start in milliseconds with the preparer already in memory and nothing to
import or pickle, and each writes its preprocessed images straight into one shared anonymous
mapping: a few bytes per image cross a pipe, and the parent copies each row out once. Items
with nothing to decode (texts, tensors) are prepared in the parent.

Forking a process that holds a model is safe for this work because the children never touch
what the parent's threads may hold: they set torch to one thread (no OpenMP team is entered),
never use CUDA (a preparer decodes on the CPU or hands the JPEG's bytes back), never write to
the index, and exit without running the parent's finalisers. They die with the parent
(PR_SET_PDEATHSIG), so a killed build leaves none behind and resumes as before.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import multiprocessing as mp
import os
import pickle
import signal
import time
from multiprocessing.connection import wait
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch

from umr.retrieval import cpu_memory
from umr.retrieval.batch_layout import flat_bytes, from_flat
from umr.retrieval.encoders.base import Prepared, Preparer
from umr.retrieval.encoders import worker_priority
from umr.retrieval.encoders.prefetch import apply_each

T = TypeVar("T")
WAIT_S = 0.5  # how often a waiting parent checks that its workers are alive, besides their pipes' ends


class WorkerDied(ChildProcessError):
    """A preparation process ended without answering (killed, out of memory, a crashing decoder)."""


def available() -> bool:
    """Whether this platform can fork (Linux, the BSDs); elsewhere builds prepare in threads."""
    return "fork" in mp.get_all_start_methods()


def offloaded(item) -> bool:
    """Whether an item has an image to decode, the only work worth another process."""
    return isinstance(getattr(item, "image", None), (str, Path, bytes, bytearray))


@dataclass(frozen=True)
class _InSlab:
    """A prepared image left in the shared mapping: what the parent needs to read it back."""

    text: str | None
    shape: tuple[int, ...]
    order: tuple[int, ...]  # its dimensions as they lie in the row (batch_layout.flat_bytes)


def probe(preparer: Preparer) -> torch.Tensor:
    """A blank image preprocessed: its dtype and size lay out the shared rows (uint8 for the
    lit towers, float32 for open_clip's transforms). Run before the fork, it also pays the
    resize's first-call import and the decoder check once rather than in every worker."""
    from PIL import Image

    preparer.check_decoders()
    return preparer.preprocess(Image.new("RGB", (preparer.image_size, preparer.image_size)))


class PreparationProcesses:
    """`workers` forked processes applying `preparer.prepare` to items; `slots` x `rows` images
    of the probe's dtype and at most its size are in flight at once (other images, and JPEGs left
    for the device, are sent pickled). Use as a context manager: leaving it stops the workers."""

    def __init__(self, preparer: Preparer, workers: int, rows: int, slots: int, idle: bool = True):
        self.ctx = mp.get_context("fork")
        blank = probe(preparer)
        self.preparer, self.workers = preparer, workers
        self.dtype, row_bytes = blank.dtype, blank.numel() * blank.element_size()
        self.rows, self.slots, self.row_bytes = rows, slots, row_bytes
        self.slab = mmap.mmap(-1, max(1, rows * slots * row_bytes))  # MAP_SHARED | MAP_ANONYMOUS
        self.pixels = np.frombuffer(self.slab, dtype=np.uint8)
        self.early: dict[tuple[int, int], list] = {}
        self.unanswered: dict[tuple[int, int], tuple] = {}  # what a restart sends again
        self._start(idle)

    def _start(self, idle: bool) -> None:
        """Fork the workers, at idle policy where `idle` and the platform has it (worker_priority)."""
        self.tasks = self.ctx.Queue()
        parent = os.getpid()
        # Each worker answers on a pipe of its own, written as it answers (no feeder thread): an
        # answer sent before a worker dies is read, and its death is the pipe's end. The
        # parent's copy of each writing end is closed at once, so no later worker inherits it.
        self.procs, self.answers = [], []
        for i in range(self.workers):
            reader, writer = self.ctx.Pipe(duplex=False)
            p = self.ctx.Process(target=_serve, name=f"umr-prepare-{i}", daemon=True,
                                 args=(self.preparer, self.tasks, writer, self.pixels, self.dtype, self.row_bytes, parent))
            p.start()
            writer.close()
            self.procs.append(p)
            self.answers.append(reader)
        self.idle = idle and any([worker_priority.make_idle(p.pid) for p in self.procs])  # a list: every one is asked

    def submit(self, seq: int, part: int, rows: list[int], items: list) -> None:
        """Prepare `items` into rows `rows` of slot seq % slots; answered as (seq, part)."""
        base = (seq % self.slots) * self.rows
        task = self.unanswered[(seq, part)] = (seq, part, [(base + r) * self.row_bytes for r in rows], items)
        self.tasks.put(task)

    def collect(self, seq: int, part: int) -> list:
        """The answers to (seq, part), in its items' order; images still in the mapping (read them
        with `read`)."""
        key = (seq, part)
        watch = None  # made once the parent has waited WAIT_S: a prompt answer costs no reading of /proc
        while key not in self.early:
            ready = wait(self.answers, timeout=WAIT_S)
            if not ready:
                self._check_alive()
                if self.idle and watch is None:
                    watch = worker_priority.StarvationWatch([p.pid for p in self.procs])
                elif self.idle and watch.starved():
                    self._restart()
                    watch = None
            for pipe in ready:
                try:
                    got_seq, got_part, out = pipe.recv()
                except (EOFError, OSError):  # the worker's end closed: it died, and said all it had
                    self._died(self.procs[self.answers.index(pipe)])
                self.early[(got_seq, got_part)] = out
                self.unanswered.pop((got_seq, got_part), None)
        return self.early.pop(key)

    def _restart(self) -> None:
        """Workers at normal policy in place of starved idle ones, with every task not yet
        answered sent again; what the old ones answered is kept. They are killed, and not waited
        for: a process at idle policy beside busy work takes seconds to die (measured: 12 s to
        reap two), but once SIGKILL is queued it runs none of its own code again, so none writes
        to the mapping. Their queue and pipes are dropped whole (a killed reader may hold the
        queue's lock); multiprocessing reaps them when it next starts a process."""
        self._stop(wait_s=0)
        self._start(idle=False)
        for task in self.unanswered.values():
            self.tasks.put(task)

    def read(self, seq: int, answers: dict[int, object], n: int) -> dict[int, object]:
        """`answers` (row -> answer) of chunk `seq` with each image in the mapping copied out.
        One copy serves the whole chunk, so images of one shape arrive as consecutive rows of
        one tensor, which device.stack_batch takes as the batch without copying again."""
        inslab = {row: a for row, a in answers.items() if isinstance(a, _InSlab)}
        if not inslab:
            return answers
        first = (seq % self.slots) * self.rows * self.row_bytes
        block = torch.from_numpy(self.pixels[first : first + n * self.row_bytes].copy()).view(self.dtype).view(n, -1)
        return {**answers, **{row: Prepared(a.text, from_flat(block[row, : math.prod(a.shape)], a.shape, a.order))
                              for row, a in inslab.items()}}

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.exitcode is not None:
                self._died(p)

    @staticmethod
    def _died(p) -> None:
        p.join(timeout=5)  # its pipe closes as it dies; its exit status follows
        how = ("gone" if p.exitcode is None else f"killed by signal {-p.exitcode}" if p.exitcode < 0
               else f"exit code {p.exitcode}")
        raise WorkerDied(
            f"an image preparation process ended ({how}), perhaps out of memory or on a file that "
            "crashed its decoder; what was committed is kept: run the same command again to go on, "
            "with --worker-kind threads to decode in this process")

    def close(self) -> None:
        self._stop(wait_s=2)
        del self.pixels
        self.slab.close()

    def _stop(self, wait_s: float) -> None:
        """End the workers: asked to (None on the queue) and given `wait_s`, then killed without
        waiting for them (see _restart). Idle ones are first put back at normal policy where this
        process may do so (root), so that they end promptly beside other work."""
        if self.idle:
            for p in self.procs:
                worker_priority.make_normal(p.pid)
        deadline = time.monotonic() + wait_s
        for _ in self.procs if wait_s > 0 else ():
            try:
                self.tasks.put(None)
            except (OSError, ValueError):
                break
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.exitcode is None:
                p.kill()
        self.tasks.cancel_join_thread()
        self.tasks.close()
        for pipe in self.answers:
            pipe.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:  # an error or an abandoned iteration: nothing more is wanted
            for p in self.procs:
                p.kill()
        self.close()


def prefetch_in_processes(chunks: Iterable[list[T]], inline: Callable[[T], object], item_of: Callable[[T], object],
                          preparer: Preparer, workers: int, rows: int, ahead: int = 2) -> Iterator[tuple[list[T], list]]:
    """As prefetch.prefetch_batches: yield (chunk, prepared or the exception per element), in
    order, `ahead` chunks in flight. Elements whose `item_of` has an image to decode go to the
    worker processes; the others get `inline` here. Chunks hold at most `rows` elements."""
    with PreparationProcesses(preparer, workers, rows, ahead + 2) as pool:
        pending: deque = deque()
        for seq, chunk in enumerate(chunks):
            if len(chunk) > rows:
                raise ValueError(f"a chunk of {len(chunk)} elements, over the {rows} rows of a slot")
            away = [i for i, e in enumerate(chunk) if offloaded(item_of(e))]
            parts = min(workers, len(away))
            for part in range(parts):
                mine = away[part::parts]
                pool.submit(seq, part, mine, [item_of(chunk[i]) for i in mine])
            sent = set(away)
            kept = [i for i in range(len(chunk)) if i not in sent]
            here = dict(zip(kept, apply_each(inline, [chunk[i] for i in kept])))
            pending.append((seq, chunk, away, parts, here))
            if len(pending) > ahead:
                yield _gather(pool, *pending.popleft())
        while pending:
            yield _gather(pool, *pending.popleft())


def _gather(pool: PreparationProcesses, seq, chunk, away, parts, here):
    answers = {}
    for part in range(parts):
        answers.update(zip(away[part::parts], pool.collect(seq, part)))
    answers = pool.read(seq, answers, len(chunk))
    return chunk, [answers[i] if i in answers else here[i] for i in range(len(chunk))]


# -- in the worker ----------------------------------------------------------------------------

def _serve(preparer: Preparer, tasks, answers, pixels: np.ndarray, dtype: torch.dtype, row_bytes: int,
           parent: int) -> None:
    _die_with(parent)
    cpu_memory.release_free_memory()  # the parent's next forward is written there: let it not copy each page first
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)
    while True:
        task = tasks.get()
        if task is None:
            return
        seq, part, offsets, items = task
        answers.send((seq, part, [_prepare_one(preparer, item, pixels, offset, dtype, row_bytes)
                                  for offset, item in zip(offsets, items)]))


def _prepare_one(preparer: Preparer, item, pixels: np.ndarray, offset: int, dtype: torch.dtype, row_bytes: int):
    try:
        p = preparer.prepare(item)
    except Exception as e:  # noqa: BLE001 - the item's problem, reported by the build
        return _portable(e)
    image = p.image
    if isinstance(image, torch.Tensor) and image.dtype == dtype and image.numel() * image.element_size() <= row_bytes:
        flat, order = flat_bytes(image)
        raw = flat.view(torch.uint8).numpy()
        pixels[offset : offset + len(raw)] = raw
        return _InSlab(p.text, tuple(image.shape), order)
    return p


def _portable(e: Exception) -> Exception:
    """`e` as it can cross the pipe: itself when it pickles back whole, else a RuntimeError
    carrying its kind and message (what a build reports of it)."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{e.__class__.__name__}: {e}")


def _die_with(parent: int) -> None:
    """End this process when the parent ends, however it ends (Linux; elsewhere the closed
    task queue ends it)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)
