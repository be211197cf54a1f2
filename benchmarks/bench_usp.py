"""usp_attention on N GPUs against one GPU and against yunchang, in one torchrun job.

# xdit-bench: torchrun

For each (B, S, H, D): the single-GPU time T1 of torch's cuDNN SDPA on the whole sequence,
then for Ulysses-N (the op's default transport, and NCCL's all-to-all and the push by name),
Ring-N and the 2 x N/2 hybrid: xdit_ops.usp_attention (eager, and replayed from a CUDA graph)
and yunchang 0.6.4's LongContextAttention with AttnType.TORCH_CUDNN, on the same shards.
Reports ms (the slowest rank's median), parallel efficiency T1 / (N * TN), the
relative error of the gathered output against an fp32 reference next to single-GPU cuDNN's,
and the host time of one eager call (default cross-rank check: the first call of a shape;
without it; checked on every call, the behaviour before the check was cached; and the default
without usp_attention's eager fast path, ``host_us_no_fast_path``: the op's dispatch, plan
lookup and Python replay), the four measured in interleaved rounds (medians of 3 x 20 calls).

Host floors, measured in the same run on the same ranks: the host time of the calls a
Python-composed usp_attention cannot avoid, each alone: one cuDNN SDPA call
(``aten._scaled_dot_product_cudnn_attention`` with LSE) at this rank's attention shape, one
``dist.all_to_all_single`` of the Ulysses Q/K/V buffer (U > 1), one ``batch_isend_irecv`` pair
(+ waits) of a ring K/V block (R > 1); ``host_floor_sum_us`` adds them the way the op calls them
(R attention calls, two all-to-alls, R - 1 ring pairs; the merge and the pack/unpack kernels not
counted). ``host_us_xdit_attention`` is the local attention op the op calls (its Python
included), at the same shape.

``--backend fp8``: usp_attention's local kernel is the FP8 attention (``XDIT_OPS_FP8_IMPL``,
default ``auto``: the sm_90a kernel on an H100 at head dim 128, else Triton); single-GPU
``xdit_ops.fp8_attention`` on the whole sequence is timed too (``t1_fp8_ms``), and each row has
the efficiency against both T1s: ``efficiency`` (against cuDNN bf16, the issue's definition) and
``efficiency_vs_fp8``, and the single-GPU FP8 error next to the parallel one. With
``--backend fp8`` the config ``ulysses-fp8wire`` is added: the NCCL Ulysses exchange with
``XDIT_OPS_USP_FP8_WIRE=1`` (quantized before the all-to-all, 1-byte codes on the wire; its
rows have ``fp8_wire`` true and ``usp_paths`` the paths the op planned), and the configs
``ring-fp8wire`` and ``ring-nccl-fp8wire``: the ring with the same switch (each rank quantizes
once with the whole sequence's statistics, the ring passes 1-byte K/V blocks; the copy-engine
ring and the NCCL P2P ring; ``usp_paths`` ``["fp8ring"]``), and on 4+ GPUs ``hybrid-fp8wire``
(2 x N/2: the FP8 wire, then FP8 blocks around the copy-engine ring; ``["fp8hybrid"]``).
``--no-host`` skips the host-time modes and floors.

Configs ``ulysses`` and ``ring`` run the op's defaults (auto: by shape, the push or the overlapped
Ulysses, the barrier ring or the flag ring); ``ring-ce`` / ``ring-ceflags`` / ``ring-nccl`` and
``ulysses-push`` / ``-overlap[-cN]`` / ``-ce`` / ``-nccl`` name a transport. Every xdit_ops row
has ``planned``: the paths and rings its plans took (``path/ring``), so what auto chose is on
record.

The overlap's head chunks (``XDIT_OPS_USP_CHUNKS``): ``ulysses-overlap`` takes the op's default
(uneven: one head first and last), ``ulysses-overlap-equal`` the equal default of sessions
10-11 (2 chunks, or 3 when 2 does not divide the share), ``ulysses-overlap-cN`` N equal chunks,
and ``ulysses-overlap-l1.4.4.1`` the chunks 1,4,4,1 (a list, dots for commas; name it in
``--configs``, or pass ``--chunks 1,4,4,1 1,2,2,1``, which adds one such config per list). A
list that does not add up to a shape's share of heads is skipped at that shape (said on rank
0). Every xdit_ops row has ``chunks``: what its plans cut the share into (the overlap's head
counts as a list, the chunk count on the other chunked paths, 1 elsewhere).

    torchrun --nproc-per-node=4 benchmarks/bench_usp.py [--quick] [--out DIR]
        [--backend auto|fp8] [--no-host] [--chunks LIST ...]
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import xdit_ops  # noqa: E402
from benchmarks.common import (  # noqa: E402
    add_common_args,
    bench_interleaved,
    host_samples_us,
    iters_of,
    parallel_efficiency,
    print_table,
    write_json,
)
from xdit_ops.ops.fp8_attention import resolve_impl  # noqa: E402
from xdit_ops.ops.usp_attention import (  # noqa: E402
    _exchange_splits,
    head_split,
    parse_chunks,
)
from xdit_ops.reference import attention_ref  # noqa: E402

# the module (xdit_ops.ops.usp_attention, the name, is the function)
_usp = importlib.import_module("xdit_ops.ops.usp_attention")

SHAPES = [(1, 4608, 24, 128), (1, 16896, 24, 128), (1, 32760, 40, 128)]


def _max_or_none(x: float | None) -> float | None:
    return None if x is None else max_over_ranks(x)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def max_over_ranks(x: float) -> float:
    t = torch.tensor([x], device="cuda", dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def host_time_us(fn, n: int = 30, sleep_cycles: int = int(3e9)) -> float:
    """Median host time of one call while the GPU is busy."""
    return statistics.median(host_samples_us(fn, n, sleep_cycles))


def host_modes_us(fn, modes: dict[str, str | None], rounds: int = 3, n: int = 20) -> dict:
    """Median host time of one call of ``fn`` under each ``XDIT_OPS_USP_CHECK`` value of
    ``modes`` (None: unset; ``"nofast"``: unset, with usp_attention's fast path off), measured
    in interleaved rounds: measured one mode after the other, the first mode read up to 4x
    above the second in run 15 although both do the same work after their first call."""
    samples: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(rounds):
        for m, value in modes.items():
            # "nofast": the default check without the public function's fast path (A/B)
            _usp.FAST_PATH = value != "nofast"
            if value in (None, "nofast"):
                os.environ.pop("XDIT_OPS_USP_CHECK", None)
            else:
                os.environ["XDIT_OPS_USP_CHECK"] = value
            for _ in range(3):  # the mode's plan (the switch is part of its key), the call
                fn()            # graph's warm-up and capture: outside the timing
            samples[m] += host_samples_us(fn, n, sleep_cycles=int(5e8))
    _usp.FAST_PATH = True
    os.environ.pop("XDIT_OPS_USP_CHECK", None)
    return {m: statistics.median(v) for m, v in samples.items()}


def host_floors(B: int, L: int, H: int, D: int, u: int, r: int, dtype) -> dict:
    """Host time (us, slowest rank) of the calls usp_attention composes, each alone, at this
    rank's sizes for a U x R grid with ``L`` tokens per shard (see the module docstring)."""
    st = xdit_ops.get_parallel_state()
    ug, rg = st.group("ulysses"), st.group("ring")
    heads = head_split(H, u)
    h = heads[dist.get_rank(ug) if u > 1 else 0]
    rows = u * L  # query rows and keys per ring block after the Ulysses gather
    q, k, v = (torch.randn(B, rows, h, D, device="cuda", dtype=dtype) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    sdpa = torch.ops.aten._scaled_dot_product_cudnn_attention.default

    def one_sdpa():
        return sdpa(qt, kt, vt, None, True, 0.0, False, False)

    def one_xdit_attention():
        return torch.ops.xdit_ops.attention.default(q, k, v, None, "auto", True)

    res = {"host_floor_sdpa_us": one_sdpa, "host_us_xdit_attention": one_xdit_attention}
    if u > 1:  # the op's Q/K/V exchange, with its split sizes
        out_splits, in_splits, total = _exchange_splits(3 * B * L * D, heads, h, True)
        send = torch.empty(3 * B * L * H * D, device="cuda", dtype=dtype)
        recv = torch.empty(total, device="cuda", dtype=dtype)
        res["host_floor_a2a_us"] = lambda: dist.all_to_all_single(
            recv, send, output_split_sizes=out_splits, input_split_sizes=in_splits, group=ug)
    if r > 1:
        ranks = dist.get_process_group_ranks(rg)
        me = dist.get_rank(rg)
        nxt, prv = ranks[(me + 1) % r], ranks[(me - 1) % r]
        block = torch.empty(2, B, rows, h, D, device="cuda", dtype=dtype)
        into = torch.empty_like(block)

        def one_pair():
            for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, block, nxt, group=rg),
                                             dist.P2POp(dist.irecv, into, prv, group=rg)]):
                w.wait()

        res["host_floor_p2p_us"] = one_pair
    out = {}
    for name, fn in res.items():
        fn()  # first call: cuDNN plan, NCCL P2P communicator
        torch.cuda.synchronize()
        # 30 calls of at most ~0.1 ms host each: ~0.1 s of queued GPU sleep covers them
        out[name] = max_over_ranks(host_time_us(fn, sleep_cycles=int(2e8)))
    out["host_floor_sum_us"] = (r * out["host_floor_sdpa_us"]
                                + 2 * out.get("host_floor_a2a_us", 0.0)
                                + (r - 1) * out.get("host_floor_p2p_us", 0.0))
    return out


def overlap_chunks_switch(name: str) -> str | None:
    """The ``XDIT_OPS_USP_CHUNKS`` value a ``ulysses-overlap*`` config name asks for: ``0``
    (the op's default) for ``ulysses-overlap``, ``equal``, ``N`` (``-cN``), the list of
    ``-l1.4.4.1`` as ``1,4,4,1``; None for any other name."""
    m = re.fullmatch(r"ulysses-overlap(?:-(equal)|-c(\d+)|-l(\d+(?:\.\d+)+))?", name)
    if m is None:
        return None
    return m.group(1) or m.group(2) or (m.group(3).replace(".", ",") if m.group(3) else "0")


def plan_chunks(plans) -> object:
    """What a config's plans cut each share into (a row's ``chunks``): the overlap's head
    counts (a list), else the chunk count; one value when every plan agrees, else the list of
    the different ones."""
    got = []
    for pl in plans:
        c = list(pl.chunk_heads) if pl.chunk_heads else pl.chunks
        if c not in got:
            got.append(c)
    return got[0] if len(got) == 1 else got


def yunchang_fn(u: int, r: int, rank: int, world: int):
    try:
        from yunchang import LongContextAttention, set_seq_parallel_pg
        from yunchang.kernels import AttnType
    except ImportError as exc:
        return None, f"yunchang not importable: {exc}"
    set_seq_parallel_pg(u, r, rank, world)
    layer = LongContextAttention(ring_impl_type="basic", attn_type=AttnType.TORCH_CUDNN)
    return layer, ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--no-yunchang", action="store_true")
    p.add_argument("--shapes", default="all", help="'all' or indices, e.g. 0,2")
    p.add_argument("--configs", default="all",
                   help="'all' or names: ulysses (the op's default transport: auto), "
                        "ulysses-nccl (NCCL all-to-all), ulysses-push (peer stores into "
                        "symmetric memory), ulysses-c2, ulysses-c3 (NCCL all-to-all "
                        "pipelined over N head chunks), ulysses-ce[-cN] (copy engines over "
                        "symmetric memory), ring, ring-nccl, hybrid; with --backend fp8 also "
                        "ulysses-fp8wire (NCCL all-to-all of FP8 codes: "
                        "XDIT_OPS_USP_FP8_WIRE=1), ring-fp8wire, ring-nccl-fp8wire (FP8 K/V "
                        "blocks around the copy-engine / NCCL ring, the same switch), "
                        "hybrid-fp8wire (both, 2 x N/2); the overlap's chunkings: "
                        "ulysses-overlap (default, uneven), ulysses-overlap-equal, "
                        "ulysses-overlap-cN, ulysses-overlap-l1.4.4.1 (the list 1,4,4,1)")
    p.add_argument("--chunks", nargs="*", default=[], metavar="LIST",
                   help="extra overlap configs, one per comma list of head chunks (e.g. "
                        "1,4,4,1 1,2,2,1): ulysses-overlap-l1.4.4.1, ...")
    p.add_argument("--backend", default="auto",
                   help="usp_attention's local kernel (attention's backends, e.g. fp8)")
    p.add_argument("--no-host", action="store_true",
                   help="skip the host-time modes and floors")
    args = p.parse_args()
    warmup, iters, rounds = iters_of(args)

    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank, world = dist.get_rank(), dist.get_world_size()
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    configs = [("ulysses", world, 1), ("ulysses-nccl", world, 1), ("ulysses-push", world, 1),
               ("ulysses-c2", world, 1), ("ulysses-c3", world, 1),
               ("ulysses-ce", world, 1), ("ulysses-ce-c1", world, 1), ("ulysses-ce-c2", world, 1),
               ("ulysses-overlap", world, 1), ("ulysses-overlap-equal", world, 1),
               ("ulysses-overlap-c2", world, 1), ("ulysses-overlap-c3", world, 1),
               ("ulysses-overlap-c5", world, 1),
               ("ring", 1, world), ("ring-ce", 1, world), ("ring-nccl", 1, world),
               ("ring-ceflags", 1, world)]
    if world >= 4 and world % 2 == 0:
        configs += [("hybrid", 2, world // 2)]
    if args.backend == "fp8":
        configs += [("ulysses-fp8wire", world, 1), ("ring-fp8wire", 1, world),
                    ("ring-nccl-fp8wire", 1, world)]
        if world >= 4 and world % 2 == 0:
            configs += [("hybrid-fp8wire", 2, world // 2)]
    if args.configs != "all":
        want = args.configs.split(",")
        configs = [c for c in configs if c[0] in want]
        # overlap chunk lists named in --configs (ulysses-overlap-l1.4.4.1)
        configs += [(n, world, 1) for n in want if n.startswith("ulysses-overlap-l")
                    and overlap_chunks_switch(n) and (n, world, 1) not in configs]
    for lst in args.chunks:
        counts = parse_chunks(lst)
        if not isinstance(counts, tuple):
            raise SystemExit(f"--chunks takes comma lists of head counts, got {lst!r}")
        name = "ulysses-overlap-l" + ".".join(map(str, counts))
        if (name, world, 1) not in configs:
            configs.append((name, world, 1))
    for name, _, _ in configs:
        if name.startswith("ulysses-overlap") and overlap_chunks_switch(name) is None:
            raise SystemExit(f"unknown overlap config {name!r}")
    dtype = torch.bfloat16
    rows = []
    for B, S, H, D in shapes:
        g = torch.Generator(device="cuda")
        g.manual_seed(1234)
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=dtype, generator=g)
                   for _ in range(3))
        ref32 = attention_ref(q.float(), k.float(), v.float())[0]
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

        def single(qt=qt, kt=kt, vt=vt):
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt)

        t1 = bench_interleaved({"t1": single}, warmup=warmup, iters=iters, rounds=1)["t1"]
        t1_ms = max_over_ranks(t1.median_ms)
        err1 = rel_err(single().transpose(1, 2), ref32)
        if rank == 0:
            print(f"shape {(B, S, H, D)}: single-GPU cuDNN {t1_ms:.3f} ms, rel err {err1:.2e}",
                  flush=True)
        t1_fp8_ms = err1_fp8 = None
        if args.backend == "fp8":
            def single_fp8(q=q, k=k, v=v):
                return xdit_ops.fp8_attention(q, k, v)

            tf = bench_interleaved({"f": single_fp8}, warmup=warmup, iters=iters, rounds=1)["f"]
            t1_fp8_ms = max_over_ranks(tf.median_ms)
            err1_fp8 = rel_err(single_fp8(), ref32)
            if rank == 0:
                print(f"  single-GPU fp8 ({resolve_impl(q.device, D)}) "
                      f"{t1_fp8_ms:.3f} ms, rel err {err1_fp8:.2e}", flush=True)
        floors_of: dict[tuple[int, int], dict] = {}
        for name, u, r in configs:
            # the ring here: copy engine over symmetric memory (opt-in in the op); "-nccl":
            # NCCL P2P (the op's default)
            # "-ceflags": the copy-engine ring synchronised by stream-memory flag words
            # "ring" (and every config without a ring suffix): the op's default, auto (the
            # barrier ring below 16384 tokens, the flag ring from there); "-ce": the barrier ring
            os.environ["XDIT_OPS_USP_RING"] = ("nccl" if "-nccl" in name else
                                               "ceflags" if "-ceflags" in name else
                                               "ce" if name.endswith("-ce") and name.startswith(
                                                   "ring") else "auto")
            # "-ce": the Ulysses exchange over the copy engines (default: its own chunking);
            # "-cN": N head chunks (falls back to 1 when heads don't split)
            ce = "-ce" in name
            # "ulysses": the op's default transport (auto: the push where peers map each
            # other's memory); "-push" / "-nccl": that transport by name
            # "-fp8wire": quantize before the exchange, NCCL all-to-all of the FP8 codes (on a
            # ring: quantize once, FP8 K/V blocks around the ring)
            wire = name.endswith("-fp8wire")
            os.environ["XDIT_OPS_USP_FP8_WIRE"] = "1" if wire else "0"
            # "-overlap": chunk 0 pushed, the rest and the outputs on the copy engines under
            # the attention (default chunking, "-equal", "-cN" or the list "-l1.4.4.1")
            overlap = name.startswith("ulysses-overlap")
            transport = ("ce" if ce else "overlap" if overlap else
                         "push" if name.endswith("-push") else
                         "nccl" if name.endswith("-nccl") or name.startswith("ulysses-c") or wire
                         else "auto")
            os.environ["XDIT_OPS_USP_ULYSSES"] = transport
            m = re.search(r"-c(\d+)$", name)
            # unset chunks (0) where the transport picks its own: ce, overlap, and auto (which
            # takes the overlap at large shapes, with its default chunking)
            chunks = (overlap_chunks_switch(name) if overlap else m.group(1) if m else
                      "0" if ce or transport == "auto" else "1")
            os.environ["XDIT_OPS_USP_CHUNKS"] = chunks
            listed = parse_chunks(chunks)
            if isinstance(listed, tuple) and sum(listed) * u != H:
                if rank == 0:
                    print(f"  {name}: skipped (chunks {chunks} do not add up to the "
                          f"{H // u if H % u == 0 else H / u} heads of a share)", flush=True)
                continue
            # a fresh plan cache per config, so that a row's usp_paths are the paths this
            # config planned (run 36 reported the union over every earlier config)
            _usp.release_call_graphs()  # (synchronized) before their plans go
            _usp._PLANS.clear()
            xdit_ops.init_parallel(ulysses_degree=u, ring_degree=r)
            shards = [xdit_ops.shard_sequence(t)[0] for t in (q, k, v)]
            def ours(shards=shards, S=S):
                return xdit_ops.usp_attention(*shards, seq_len=S, backend=args.backend)

            fns = {"xdit_ops": ours}
            note = ""
            if not args.no_yunchang and S % world == 0 and H % u == 0 and name in (
                    "ulysses", "ring", "hybrid"):
                layer, note = yunchang_fn(u, r, rank, world)
                if layer is not None:
                    fns["yunchang"] = lambda layer=layer, shards=shards: layer(*shards)
            timings = bench_interleaved(fns, warmup=warmup, iters=iters, rounds=rounds)
            graph_ms = None
            graph_note = ""
            try:
                tg = bench_interleaved({"g": ours}, warmup=3, iters=iters, rounds=1,
                                       cuda_graph=True)["g"]
                graph_ms = max_over_ranks(tg.median_ms)
            except Exception as exc:  # record why capture failed instead of dying
                graph_note = f"cuda graph failed: {type(exc).__name__}: {exc}"[:300]
                torch.cuda.synchronize()
            if args.no_host:
                host = {"default": None, "nocheck": None, "always": None, "nofast": None}
                floors = {}
            else:
                host = host_modes_us(ours, {"default": None, "nocheck": "0", "always": "always",
                                            "nofast": "nofast"})
                if (u, r) not in floors_of:  # the floors do not depend on the transport switches
                    floors_of[(u, r)] = host_floors(B, shards[0].shape[1], H, D, u, r, dtype)
                floors = floors_of[(u, r)]
            host_default, host_nocheck, host_always = (
                host["default"], host["nocheck"], host["always"])
            # this config's plans (the cache is cleared per config)
            mine = [pl for pl in _usp._PLANS.values() if pl.U == u and pl.R == r]
            for impl, fn in fns.items():
                out = fn()
                full = xdit_ops.gather_sequence(out.contiguous(), S)
                err = rel_err(full, ref32)
                ms = max_over_ranks(timings[impl].median_ms)
                row = {
                    "shape": [B, S, H, D], "config": name, "ulysses": u, "ring": r,
                    "chunks": plan_chunks(mine) if impl == "xdit_ops" else None,
                    "impl": impl, "ms": ms, "t1_ms": t1_ms,
                    "efficiency": parallel_efficiency(t1_ms, world, ms),
                    "rel_err": err, "rel_err_single_cudnn": err1,
                    "err_ratio": err / err1 if err1 else None,
                    "timing": timings[impl],
                    "backend": args.backend if impl == "xdit_ops" else "cudnn",
                }
                if impl == "xdit_ops" and u > 1 and r == 1:
                    row["ulysses_transport"] = transport
                    row["chunks_switch"] = chunks
                if impl == "xdit_ops" and r > 1:
                    row["ring_transport"] = os.environ["XDIT_OPS_USP_RING"]
                if impl == "xdit_ops":  # the host path of overlap / ceflags (A/B: =lists)
                    row["usp_host_path"] = os.environ.get("XDIT_OPS_USP_HOST", "tensors")
                    # what the plans took (auto resolves per shape): Ulysses path, ring
                    row["planned"] = sorted({f"{pl.path}/{pl.ring}" for pl in mine})
                    # eager calls replayed from the op's own graph (auto: below 16384 tokens)
                    row["usp_graph"] = os.environ.get("XDIT_OPS_USP_GRAPH", "auto")
                    row["graphed"] = any(isinstance(g, _usp._CallGraph)
                                         for pl in mine for g in pl.graphs.values())
                if t1_fp8_ms is not None and impl == "xdit_ops":
                    row |= {"fp8_wire": wire,
                            "usp_paths": sorted({pl.path for pl in mine}),
                            "fp8_impl": resolve_impl(q.device, D),
                            "t1_fp8_ms": t1_fp8_ms,
                            "efficiency_vs_fp8": parallel_efficiency(t1_fp8_ms, world, ms),
                            "rel_err_single_fp8": err1_fp8}
                if impl == "xdit_ops":
                    row |= {
                        "graph_ms": graph_ms,
                        "graph_efficiency": None if graph_ms is None else
                        parallel_efficiency(t1_ms, world, graph_ms),
                        "host_us": _max_or_none(host_default),
                        "host_us_nocheck": _max_or_none(host_nocheck),
                        "host_us_check_every_call": _max_or_none(host_always),
                        "host_us_no_fast_path": _max_or_none(host["nofast"]),
                        **floors,
                        "note": graph_note,
                    }
                elif note:
                    row["note"] = note
                rows.append(row)
                if rank == 0:
                    print(f"  {name:8s} {impl:9s} {ms:8.3f} ms  eff {row['efficiency']:.3f}  "
                          f"err {err:.2e} (x{row['err_ratio']:.2f})"
                          + (f"  graph {graph_ms:.3f} ms" if impl == "xdit_ops" and graph_ms
                             else "") + (f"  host {row['host_us']:.0f} us (floor "
                                         f"{row['host_floor_sum_us']:.0f})"
                                         if impl == "xdit_ops" and not args.no_host else "")
                      + (f"  vs fp8 T1 eff {row['efficiency_vs_fp8']:.3f}"
                         if "efficiency_vs_fp8" in row else "")
                      + (f"  chunks {row['chunks']}" if impl == "xdit_ops" and overlap
                         else ""), flush=True)
        del q, k, v, ref32
        torch.cuda.empty_cache()
    if rank == 0:
        path = write_json("bench_usp", rows, args.out, extra={"gpus_used": world})
        print(f"wrote {path}")
        print_table(rows, ["shape", "config", "impl", "chunks", "ms", "t1_ms", "efficiency",
                           "graph_ms", "graph_efficiency", "rel_err", "err_ratio"])
        if args.backend == "fp8":
            print_table([r for r in rows if r["impl"] == "xdit_ops"],
                        ["shape", "config", "fp8_impl", "ms", "t1_fp8_ms", "efficiency_vs_fp8",
                         "rel_err", "rel_err_single_fp8"])
    if rank == 0 and not args.no_host:
        print("\nhost time of one eager call (us, slowest rank) and its floors")
        print_table([r for r in rows if r["impl"] == "xdit_ops"],
                    ["shape", "config", "host_us", "host_us_no_fast_path", "host_us_nocheck",
                     "host_us_check_every_call",
                     "host_floor_sum_us", "host_floor_sdpa_us", "host_us_xdit_attention",
                     "host_floor_a2a_us", "host_floor_p2p_us"], floatfmt=".1f")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
