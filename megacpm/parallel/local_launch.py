"""Run a function in N processes on this machine, as torchrun would, and collect the results.

    results = run_distributed(fn, world_size=4, args=(...))   # results[rank] = fn(*args) on that rank

Used by the tests (gloo layouts on one CPU machine) and by tools/bench_parallel.py.

``fn`` must be importable (module level). Each child gets torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT); a child's exception is re-raised in the parent with
its traceback, and a child that hangs is killed after ``timeout`` seconds.
"""
import io
import multiprocessing as mp
import os
import queue
import random
import socket
import time
import traceback

import torch


# Ports handed out below the kernel's ephemeral range: a port picked there (bind to 0) can be taken
# meanwhile as the source port of any outgoing connection (a gloo or store client of an earlier
# group), and a group told to listen on it later fails with EADDRINUSE.
_PORT_FLOOR = 10000
_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"


def _ephemeral_low() -> int:
    try:
        with open(_EPHEMERAL_RANGE) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and, where the ephemeral range leaves room below
    it, outside that range (so no outgoing connection takes it before the group listens on it)."""
    low = _ephemeral_low()
    if low > _PORT_FLOOR + 1000:
        chooser = random.SystemRandom()
        for _ in range(200):
            port = chooser.randrange(_PORT_FLOOR, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(fn, rank, world_size, port, args, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # The machine's cores shared among the ranks, as torchrun's OMP_NUM_THREADS=1 does: each
    # rank's default of every core oversubscribes them, and gloo's collectives then wait on
    # descheduled peers (world 4 on 2 cores: steps 10x slower).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        # Serialised here, not by the queue: a tensor pickled by the queue would live in shared
        # memory that vanishes when this child exits, possibly before the parent reads it.
        buffer = io.BytesIO()
        torch.save(fn(*args), buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _reported_late(results, dead, grace_s: float = 5.0) -> bool:
    """Whether a result is still on its way (a rank may report, then crash in its teardown): the
    queue is given ``grace_s`` more before the dead ranks are declared silent. A result found is
    put back for the main loop."""
    try:
        item = results.get(timeout=grace_s)
    except queue.Empty:
        return False
    results.put(item)
    return True


def run_distributed(fn, world_size: int, args=(), timeout: float = 240.0):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, rank, world_size, port, args, results), daemon=True)
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    collected, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world_size and not errors:
            try:
                rank, status, value = results.get(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                # A child that died before reporting (it could not even unpickle ``fn``, or was
                # killed) never will: say so now instead of at the deadline.
                dead = [r for r, proc in enumerate(procs) if r not in collected and proc.exitcode not in (None, 0)]
                if dead and not _reported_late(results, dead):
                    errors.append(f"ranks {dead} exited (codes {[procs[r].exitcode for r in dead]}) without a result")
                elif time.monotonic() >= deadline:
                    errors.append(f"timed out after {timeout}s; ranks done: {sorted(collected)}")
                continue
            if status == "ok":
                collected[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"rank {rank} failed:\n{value}")  # the others may now hang: stop waiting
    finally:
        for proc in procs:
            proc.join(timeout=5 if errors else 30)
            if proc.is_alive():
                proc.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [collected[r] for r in range(world_size)]
