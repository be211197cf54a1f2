"""Ulysses pack/unpack: the fused copy ops vs the torch copies ``usp_attention`` made before them.

For each per-rank shape (local sequence L, heads split over U ranks, J joint rows), on one GPU:

* pack: ``torch_stack`` (even heads: ``torch.stack`` of permuted views) or ``torch_loop`` (uneven
  heads: one ``copy_`` per rank and tensor), exactly the send buffer ``_ulysses_in`` built,
  against ``xdit_ops::ulysses_pack_qkv``. q, k, v are views of a fused projection output
  ``[B, L, 3, H, D]`` (strided), as a fused QKV linear leaves them.
* place: the former ``_place_gathered``, now the op's CPU reference ``_place_cpu`` (the received
  ``[U, 3, B, L, h, D]`` plus rank 0's joint heads into the query buffer and the K/V buffer,
  joint K/V inline) against ``xdit_ops::ulysses_place_gathered``.
* unpack: the placement ``_ulysses_out`` did after its exchange (``torch_permute`` for even
  heads, ``torch_loop`` for uneven) against ``xdit_ops::ulysses_unpack_out``, joint rows behind
  (the harder case) when J > 0.

Candidates of one shape are timed interleaved in one process (:func:`common.bench_interleaved`).
Reported: median ms, GB/s (bytes read + written / t), speedup over the torch path, and whether
the op's result is bit-equal to it.

    python benchmarks/bench_ulysses_pack.py [--out DIR] [--quick] [--cold-l2] [--cuda-graph]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import xdit_ops  # noqa: E402, F401  (registers the ops)
from xdit_ops.ops.ulysses_pack import (  # noqa: E402
    _place_cpu,  # the op's torch reference: the copies usp_attention made before the kernel
    ulysses_pack_qkv,
    ulysses_place_gathered,
    ulysses_unpack_out,
)

# (name, B, L per rank, heads per rank, D, J): Flux (24 heads, 512 text tokens) over 2 and 4
# ranks, Wan 2.1 14B (40 heads, no joint rows) over 4 and 8, 30 heads over 4 (uneven), and
# CogVideoX (48 heads of 64, 226 text tokens) over 4.
CASES = [
    ("flux_u2", 1, 2304, [12, 12], 128, 512),
    ("flux_u4", 1, 1152, [6] * 4, 128, 512),
    ("wan14b_u4", 1, 8190, [10] * 4, 128, 0),
    ("wan14b_u8", 1, 4095, [5] * 8, 128, 0),
    ("h30_u4_uneven", 1, 4096, [8, 8, 7, 7], 128, 77),
    ("cogvideox_u4", 2, 4388, [12] * 4, 64, 226),
]


def torch_pack(q, k, v, heads):
    """The send buffer ``usp_attention._ulysses_in`` built before the op (both branches)."""
    B, L, H, D = q.shape
    U = len(heads)
    if all(h == heads[0] for h in heads):
        h = heads[0]
        return torch.stack([t.reshape(B, L, U, h, D).permute(2, 0, 1, 3, 4)
                            for t in (q, k, v)], dim=1).reshape(-1)
    send = q.new_empty(3 * B * L * H * D)
    off = start = 0
    for hj in heads:
        n = 3 * B * L * hj * D
        view = send[off:off + n].view(3, B, L, hj, D)
        for i, t in enumerate((q, k, v)):
            view[i].copy_(t[:, :, start:start + hj])
        off += n
        start += hj
    return send


def torch_unpack(recv, heads, B, J, L, joint_front):
    """The placement ``usp_attention._ulysses_out`` did with what it received before the op."""
    U, H = len(heads), sum(heads)
    D = recv.numel() // (B * (J + L) * H)
    out = recv.new_empty(B, J + L, H, D)
    rows_joint = slice(0, J) if joint_front else slice(L, L + J)
    rows_seq = slice(J, J + L) if joint_front else slice(0, L)
    if all(h == heads[0] for h in heads):
        h = heads[0]
        src = recv.view(U, B, J + L, h, D).permute(1, 2, 0, 3, 4)
        dst = out.view(B, J + L, U, h, D)
        if joint_front or not J:
            dst.copy_(src)
        else:
            dst[:, rows_joint].copy_(src[:, :J])
            dst[:, rows_seq].copy_(src[:, J:])
        return out
    off = start = 0
    for hi in heads:
        n = B * (J + L) * hi * D
        piece = recv[off:off + n].view(B, J + L, hi, D)
        if J:
            out[:, rows_joint, start:start + hi] = piece[:, :J]
        out[:, rows_seq, start:start + hi] = piece[:, J:]
        off += n
        start += hi
    return out


def candidates(q, k, v, recv, recv_in, heads, B, J, L, es) -> dict[str, tuple[dict, int]]:
    """{"pack" | "place" | "unpack": ({impl: call}, bytes read + written)}; torch path first.

    The joint rows for "place" are the first J rows of q, k, v (any [B, J, H, D] views do)."""
    H, D = q.shape[2], q.shape[3]
    U, h = len(heads), heads[0]
    joint = (q[:, :J], k[:, :J], v[:, :J]) if J else (None, None, None)
    tag = "torch_stack" if all(x == heads[0] for x in heads) else "torch_loop"
    utag = "torch_permute" if tag == "torch_stack" else "torch_loop"
    return {
        "pack": ({tag: lambda: torch_pack(q, k, v, heads),
                  "xdit_op": lambda: ulysses_pack_qkv(q, k, v, heads)},
                 2 * 3 * q.shape[0] * q.shape[1] * H * D * es),
        "place": ({"torch_copies": lambda: _place_cpu(recv_in, U, B, L, h, *joint, 0, True),
                   "xdit_op": lambda: ulysses_place_gathered(recv_in, U, B, L, h, *joint, 0,
                                                             True)},
                  2 * 3 * B * (J + U * L) * h * D * es),
        "unpack": ({utag: lambda: torch_unpack(recv, heads, B, J, L, False),
                    "xdit_op": lambda: ulysses_unpack_out(recv, heads, B, J, L, False)},
                   2 * B * (J + L) * H * D * es),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--cases", nargs="+", default=[c[0] for c in CASES],
                   choices=[c[0] for c in CASES])
    args = p.parse_args(argv)
    missing = common.native_gpu_missing("bench_ulysses_pack")
    if missing:
        print(missing, file=sys.stderr)
        return 2
    warmup, iters, rounds = common.iters_of(args)
    dtype = getattr(torch, args.dtype)
    es = torch.empty((), dtype=dtype).element_size()
    dev = torch.device("cuda")
    rows = []
    for name, B, L, heads, D, J in CASES:
        if name not in args.cases:
            continue
        H = sum(heads)
        gen = torch.Generator(device=dev).manual_seed(0)
        qkv = torch.randn(B, L, 3, H, D, device=dev, dtype=dtype, generator=gen)
        q, k, v = qkv.unbind(2)
        recv = torch.randn(B * (J + L) * H * D, device=dev, dtype=dtype, generator=gen)
        recv_in = torch.randn(len(heads) * 3 * B * L * heads[0] * D, device=dev, dtype=dtype,
                              generator=gen)
        groups = candidates(q, k, v, recv, recv_in, heads, B, J, L, es)
        for kind, (fns, nbytes) in groups.items():
            base_name = next(n for n in fns if n != "xdit_op")
            got, want = fns["xdit_op"](), fns[base_name]()
            if isinstance(got, tuple):
                exact = all(bool(torch.equal(a, b)) for a, b in zip(got, want, strict=True))
            else:
                exact = bool(torch.equal(got, want))
            del got, want
            timings = common.bench_interleaved(fns, warmup=warmup, iters=iters, rounds=rounds,
                                               cold_l2=args.cold_l2, cuda_graph=args.cuda_graph,
                                               device=dev)
            base_ms = timings[base_name].median_ms
            for cand, t in timings.items():
                rows.append({
                    "case": name, "op": kind, "impl": cand, "B": B, "L": L, "J": J,
                    "heads": heads, "D": D, "dtype": args.dtype, "ms": t.median_ms,
                    "gbps": common.gbps(nbytes, t.median_ms), "bytes": nbytes,
                    "speedup_vs_torch": base_ms / t.median_ms,
                    "bit_exact_vs_torch": exact, "timing": t,
                })
        del qkv, q, k, v, recv, recv_in, groups
        torch.cuda.empty_cache()
    path = common.write_json("bench_ulysses_pack", rows, args.out, extra={
        "warmup": warmup, "iters": iters, "rounds": rounds, "cold_l2": args.cold_l2,
        "cuda_graph": args.cuda_graph})
    common.print_table(rows, ["case", "op", "impl", "ms", "gbps", "speedup_vs_torch",
                              "bit_exact_vs_torch"])
    print(f"wrote {path}")
    return 0 if all(r["bit_exact_vs_torch"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
