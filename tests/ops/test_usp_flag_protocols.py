"""The flag protocol of the copy-engine ring (``XDIT_OPS_USP_RING=ceflags``), model-checked on CPU.

Stream memory operations need a GPU, so the CPU tests run the protocol itself: every rank of a
simulated ring gets the program ``ring_flag_schedule`` / ``ring_flag_programs`` produce (the
same data ``_ring_ce_flags`` runs on the GPU), split into its compute and side streams (FIFO
queues; a join waits for what the other stream had queued before it), and a random scheduler
runs any op whose stream is at it and whose condition holds (a flag wait: the word equals the
value), for several calls in a row. Checked: no deadlock, every pull reads the block that step
needs, every attention reads the block of its step, and the flags end as they started (so the
next call, or a CUDA-graph replay, starts from the same state). A protocol with one wait or
signal removed must fail, so the check can catch what it is there for.
"""

from __future__ import annotations

import random

import pytest

from xdit_ops.ops.stream_memops import WAIT
from xdit_ops.ops.usp_attention import ring_flag_programs, ring_flag_schedule


class ProtocolError(AssertionError):
    pass


def _queues(R, calls, mutate=None):
    """Per rank, the compute and side queues of ``calls`` calls: ops ("wait"|"write", j, w, v),
    ("join", other, upto), ("fill",), ("pull", b, step), ("attend", step), each tagged with
    its call index."""
    qs = []
    for r in range(R):
        progs = ring_flag_programs(R, r)
        if mutate:
            progs = mutate(progs)
        q = {"compute": [], "side": []}
        for n in range(calls):
            attends = 0  # a pull is queued before the attention of its step
            for stream, op, arg in ring_flag_schedule(R):
                if op == "join":
                    q[stream].append(("join", arg, len(q[arg]), n))
                elif op == "flags":
                    name, b = arg
                    for kind, j, w, v in progs[name][b]:
                        q[stream].append(("wait" if kind == WAIT else "write", j, w, v, n))
                elif op == "fill":
                    q[stream].append(("fill", n))
                elif op == "pull":
                    q[stream].append(("pull", arg, attends, n))
                else:
                    q[stream].append(("attend", arg, n))
                    attends += 1
        qs.append(q)
    return qs


def _run(R, calls, seed, mutate=None):
    rng = random.Random(seed)
    qs = _queues(R, calls, mutate)
    done = [{"compute": 0, "side": 0} for _ in range(R)]
    flags = [[0, 0, 1, 1] for _ in range(R)]
    bufs = [[None, None] for _ in range(R)]
    while True:
        ready = []
        for r in range(R):
            for st in ("compute", "side"):
                i = done[r][st]
                if i == len(qs[r][st]):
                    continue
                op = qs[r][st][i]
                if op[0] == "join" and done[r][op[1]] < op[2]:
                    continue
                if op[0] == "wait" and flags[op[1]][op[2]] != op[3]:
                    continue
                ready.append((r, st, op))
        if not ready:
            left = [(r, st, qs[r][st][done[r][st]]) for r in range(R) for st in ("compute", "side")
                    if done[r][st] < len(qs[r][st])]
            if left:
                raise ProtocolError(f"R={R}: deadlock with {left}")
            break
        r, st, op = rng.choice(ready)
        kind = op[0]
        if kind == "write":
            flags[op[1]][op[2]] = op[3]
        elif kind == "fill":
            bufs[r][0] = (op[1], r)
        elif kind == "pull":
            _, b, step, n = op
            want = (n, (r - step - 1) % R)
            got = bufs[(r - 1) % R][b]
            if got != want:
                raise ProtocolError(f"R={R} rank {r} call {n} step {step}: pulled {got}, "
                                    f"needs {want}")
            bufs[r][1 - b] = got
        elif kind == "attend":
            _, step, n = op
            want = (n, (r - step) % R)
            if bufs[r][step % 2] != want:
                raise ProtocolError(f"R={R} rank {r} call {n}: step {step} attends "
                                    f"{bufs[r][step % 2]}, needs {want}")
        done[r][st] += 1
    if flags != [[0, 0, 1, 1]] * R:
        raise ProtocolError(f"R={R}: flags end as {flags}, not as they started")


@pytest.mark.parametrize("R", [2, 3, 4, 5, 8])
def test_ring_flag_protocol_orders_every_block(R):
    for seed in range(60):
        _run(R, 3, seed)


def _drop(name, index):
    """A mutation: remove operation ``index`` of program ``name`` (every buffer)."""
    def mutate(progs):
        out = dict(progs)
        out[name] = [prog[:index] + prog[index + 1:] for prog in progs[name]]
        return out
    return mutate


@pytest.mark.parametrize("mutation", [
    ("before_pull", 0),  # pull without waiting for the previous rank's block: stale data
    ("before_pull", 1),  # overwrite a buffer the next rank has not pulled yet
    ("last", 0),         # never free the last block's buffer: the next call hangs
    ("pulled", 0),       # never tell the previous rank: it hangs before its next overwrite
])
def test_ring_flag_protocol_check_catches_a_broken_protocol(mutation):
    failures = 0
    for R in (3, 4):
        for seed in range(60):
            try:
                _run(R, 3, seed, _drop(*mutation))
            except ProtocolError:
                failures += 1
    assert failures > 0, f"removing {mutation} went unnoticed"
