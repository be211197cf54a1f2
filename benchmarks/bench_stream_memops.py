"""Host time of queuing stream memory operations and copy-engine copies: run 43's list path
against the tensor ops (``stream_memops_t``, ``copy2d_t``) that ``XDIT_OPS_USP_HOST=tensors``
(usp's default) uses.

What usp's overlap path and flag ring queue per call, one operation at a time, timed on the host
(``time.perf_counter_ns``; the median over rounds of the mean of ``--iters`` calls; nothing is
synchronised inside a round):

* ``memops``: one flag program of 9 triples (3 writes, 3 waits for them, 3 resets: the size of
  the overlap path's ``start`` at U = 4), ``run_memops(list, checked=False)`` against
  ``stream_memops_t(tensor)``.
* ``copy2d``: one destination's input copies (3 descriptors: q, k, v rows of one head chunk),
  rebased in Python and passed as a list (``run_copy2d(rebased(...))``) against
  ``copy2d_t(template, which, bases)``, the rebase in C++.
* ``side``: a flag program queued on a side stream after it waits for the compute stream:
  ``wait_stream`` + ``with torch.cuda.stream(side)`` + the list op, against one reused event
  (record, ``wait_event``) + the tensor op given the stream's handle.
* and single pieces, one column: a stream context, ``wait_stream``, a reused event's record +
  ``wait_event``, a new ``torch.cuda.Event()``.

Without a GPU (``--cpu``, or none visible) only what runs on the CPU is timed: the Python
argument preparation of the list path (``rebased`` + ``list`` copies + the environment read,
per call), ``copy2d_t`` on host memory with empty copies (its dispatch, rebase and checks: the
whole host cost of the tensor op but the driver call), and ``copy2d_t`` with 1 and with 19
``bases`` (the difference: what converting 18 Python ints through the dispatcher costs, the
size of an overlap flag program at U = 4). Those rows are labelled ``device: cpu``.

    python benchmarks/bench_stream_memops.py [--out DIR] [--iters N] [--rounds R] [--cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import xdit_ops  # noqa: E402, F401  (registers the ops)
from xdit_ops.ops.stream_memops import (  # noqa: E402
    BATCH_ENV,
    WAIT,
    WRITE,
    copy2d_template,
    program_tensor,
    rebased,
    rows2d,
    run_copy2d,
    run_memops,
    template,
)

MEMOPS_T = torch.ops.xdit_ops.stream_memops_t.default
COPY2D_T = torch.ops.xdit_ops.copy2d_t.default


def host_us(fn, iters: int, rounds: int) -> float:
    """Median over ``rounds`` of the mean host microseconds of one ``fn()`` over ``iters``."""
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(iters):
            fn()
        out.append((time.perf_counter_ns() - t0) / iters / 1e3)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return statistics.median(out)


def _templates(device: str):
    """One destination's q, k, v copies of a head chunk (B = 1, 64 rows, 2 heads of 128) as a
    template over sources q, k, v [1, 64, 8, 128] bf16, and the tensors."""
    src = [torch.zeros(1, 64, 8, 128, dtype=torch.bfloat16, device=device) for _ in range(3)]
    dst = torch.zeros(3, 1, 64, 2, 128, dtype=torch.bfloat16, device=device)
    tmpl, which = [], []
    for i, s in enumerate(src):
        d = rows2d(dst[i], s[:, :, 2:4])
        tmpl += template(d, s.data_ptr())
        which += [i] * (len(d) // 6)
    return tmpl, which, src, dst


def gpu_rows(iters: int, rounds: int) -> list[dict]:
    f = torch.zeros(8, dtype=torch.int32, device="cuda")
    a = [f.data_ptr() + 4 * i for i in range(3)]
    prog = ([x for w in a for x in (WRITE, w, 1)] + [x for w in a for x in (WAIT, w, 1)]
            + [x for w in a for x in (WRITE, w, 0)])
    prog_t = program_tensor(prog)
    tmpl, which, src, _dst = _templates("cuda")
    t_t, w_t = copy2d_template(tmpl, which)
    bases = [s.data_ptr() for s in src]
    batched = os.environ.get(BATCH_ENV, "1") != "0"
    compute = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    sid = side.cuda_stream
    ev = torch.cuda.Event()

    def side_lists():
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            run_memops(f, prog, checked=False)

    def side_tensors():
        ev.record(compute)
        side.wait_event(ev)
        MEMOPS_T(f, prog_t, batched, sid)

    cases = {
        "memops": (lambda: run_memops(f, prog, checked=False),
                   lambda: MEMOPS_T(f, prog_t, batched, -1)),
        "copy2d": (lambda: run_copy2d(f, rebased(tmpl, which, bases), checked=False),
                   lambda: COPY2D_T(f, t_t, w_t, bases, -1)),
        "side": (side_lists, side_tensors),
    }
    rows = []
    for name, (lists, tensors) in cases.items():
        for fn in (lists, tensors):  # warm-up
            for _ in range(20):
                fn()
        torch.cuda.synchronize()
        ul, ut = [], []
        for _ in range(rounds):  # interleaved
            ul.append(host_us(lists, iters, 1))
            ut.append(host_us(tensors, iters, 1))
        rows.append({"device": torch.cuda.get_device_name(), "case": name,
                     "host_us_lists": statistics.median(ul),
                     "host_us_tensors": statistics.median(ut)})
    def ctx():
        with torch.cuda.stream(side):
            pass

    def fork():
        ev.record(compute)
        side.wait_event(ev)

    # single pieces of the list path's host work, to place the rest of a call's host time
    singles = {"stream context (enter + exit)": ctx,
               "side.wait_stream(compute)": lambda: side.wait_stream(compute),
               "event record + wait_event (reused)": fork,
               "torch.cuda.Event()": torch.cuda.Event}
    for name, fn in singles.items():
        for _ in range(20):
            fn()
        rows.append({"device": torch.cuda.get_device_name(), "case": name,
                     "host_us_lists": host_us(fn, iters, rounds), "host_us_tensors": None})
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    return rows


def cpu_rows(iters: int, rounds: int) -> list[dict]:
    tmpl, which, src, dst = _templates("cpu")
    bases = [s.data_ptr() for s in src]
    prog = [WRITE, 64, 1] * 3 + [WAIT, 64, 1] * 3 + [WRITE, 64, 0] * 3

    def prep_lists():  # what run_copy2d / run_memops (checked=False) do before the op
        list(rebased(tmpl, which, bases))
        list(prog)
        os.environ.get(BATCH_ENV, "1")

    empty = list(tmpl)
    for i in range(4, len(empty), 6):
        empty[i] = 0  # width 0: rebased and checked, nothing copied
    e_t, w_t = copy2d_template(empty, which)
    none = torch.tensor([], dtype=torch.int64)
    abs_t, _ = copy2d_template(rows2d(dst[0], src[0][:, :, 2:4]))
    abs_t[4::6] = 0
    cases = {
        "prep_lists (python per call, no op)": prep_lists,
        "copy2d_t host op, 3 empty copies": lambda: COPY2D_T(dst, e_t, w_t, bases, -1),
        "copy2d_t, 1 base": lambda: COPY2D_T(dst, abs_t, none, [1], -1),
        "copy2d_t, 19 bases": lambda: COPY2D_T(dst, abs_t, none, [1] * 19, -1),
    }
    rows = []
    for name, fn in cases.items():
        for _ in range(100):
            fn()
        rows.append({"device": "cpu", "case": name, "host_us": host_us(fn, iters, rounds)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(common.DEFAULT_OUT), help="folder for the JSON result")
    p.add_argument("--iters", type=int, default=2000, help="calls per round")
    p.add_argument("--rounds", type=int, default=7, help="rounds (median)")
    p.add_argument("--cpu", action="store_true", help="time the CPU parts only")
    args = p.parse_args()
    gpu = torch.cuda.is_available() and not args.cpu
    rows = gpu_rows(args.iters, args.rounds) if gpu else cpu_rows(args.iters, args.rounds)
    common.print_table(rows, list(rows[0].keys()))
    path = common.write_json("bench_stream_memops", rows, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
