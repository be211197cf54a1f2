"""gather_rows (the VAE halo packing) against the torch copies halo_conv made before it.

For each case, on one GPU, the two things ``xdit_ops/parallel/halo.py`` does with rows:

* ``send``: the send buffer of one peer, ``x.narrow(-2, lo, n).contiguous()`` (torch) against
  ``halo._take_rows`` (one ``gather_rows``).
* ``slab``: a boundary slab from own rows, rows received from the neighbours and fill rows:
  ``torch.cat`` of ``narrow`` views and ``new_full`` pieces (torch, the former ``_assemble``)
  against ``halo._assemble`` (one ``gather_rows``, cached device index).

Shapes: the last decoder level of a Flux ``AutoencoderKL`` 4096^2 decode over 4 ranks (128
channels, W = 4096), of a Wan 2.1 1280x720 decode (96 channels, 4 frames, W = 1280), a slab of
64 rows (bandwidth), and an odd W (2-byte accesses). Reported: median ms, GB/s (bytes read +
written / t), that figure over a large ``copy_`` measured in the same process (what this GPU's
memory sustains for a copy) and over the nominal HBM peak where the GPU is known, the speedup
over torch, and whether both results are bit-equal.

    python benchmarks/bench_gather_rows.py [--out DIR] [--quick] [--cold-l2] [--cuda-graph]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import xdit_ops  # noqa: E402, F401  (registers the ops)
from xdit_ops.parallel.halo import ConvRows, _assemble, _slab_plan, _take_rows  # noqa: E402

# Nominal HBM bandwidth (GB/s) by device name prefix, for the fraction-of-peak column.
NOMINAL_GBPS = {"NVIDIA H100 80GB HBM3": 3350.0, "NVIDIA H200": 4800.0}

# (name, leading dims, band rows, W, halo rows ``above``, own rows ``own``): the slab is the rows
# [first - above, first + own) at a rank's top edge, the rows above received from the rank above
# (or, at the global top, fill rows of the zero padding); the send buffer is ``above`` rows.
CASES = [
    ("flux4096_r4", (1, 128), 1024, 4096, 1, 2),
    ("wan720_r4", (1, 96, 4), 180, 1280, 1, 2),
    ("slab64", (1, 256), 256, 2048, 32, 32),
    ("odd_w", (1, 128), 512, 1023, 1, 2),
]


def torch_slab(x, first, lo, hi, h_total, geom, received, fill):
    """The former ``_assemble``: runs of own / received / fill rows, ``torch.cat`` of them."""
    plan = _slab_plan(first, x.shape[-2], lo, hi, h_total, geom.mode,
                      tuple((p, rows) for p, (rows, _) in received.items()))
    sources = [x] + [received[p][1] for p in plan.peers]
    pieces, run = [], None  # run: [source, first row, rows]
    for s, r in plan.pairs:
        if run is not None and s == run[0] and (s < 0 or r == run[1] + run[2]):
            run[2] += 1
            continue
        if run is not None:
            pieces.append(run)
        run = [s, r, 1]
    pieces.append(run)
    out = []
    for s, r, n in pieces:
        if s < 0:
            shape = list(x.shape)
            shape[-2] = n
            out.append(x.new_full(shape, fill))
        else:
            out.append(sources[s].narrow(-2, r, n))
    return out[0] if len(out) == 1 else torch.cat(out, dim=-2)


def make_case(lead, band, width, above, own, dtype, dev, *, global_top):
    """A band (rows [first, first + band) of a tall tensor), the rows received from the rank
    above, and the slab window [first - above, first + own)."""
    gen = torch.Generator(device=dev).manual_seed(0)
    first = 0 if global_top else band
    h_total = 4 * band
    x = torch.randn(*lead, band, width, device=dev, dtype=dtype, generator=gen)
    received = {}
    if not global_top:
        rows = tuple(range(first - above, first))
        received[0] = (rows, torch.randn(*lead, above, width, device=dev, dtype=dtype,
                                         generator=gen))
    return x, first, first - above, first + own, h_total, received


def copy_gbps(dev: torch.device, warmup: int, iters: int) -> float:
    """What a plain device-to-device ``copy_`` of 1 GiB sustains: the yardstick for the ops."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = common.bench(lambda: dst.copy_(src), warmup=warmup, iters=iters, device=dev)
    return common.gbps(2 * src.numel(), t.median_ms)


def candidates(x, first, lo, hi, h_total, received, above, global_top):
    """{"slab" | "send": ({impl: call}, bytes read + written)}, torch first."""
    geom = ConvRows(2 * above + 1, pad_top=above, pad_bottom=above, mode="zeros")
    row_bytes = x.numel() // x.shape[-2] * x.element_size()
    n_fill = above if global_top else 0
    groups = {
        "slab": ({"torch": lambda: torch_slab(x, first, lo, hi, h_total, geom, received, 0.0),
                  "xdit_op": lambda: _assemble(x, first, lo, hi, h_total, geom, received, 0.0)},
                 (hi - lo) * row_bytes + (hi - lo - n_fill) * row_bytes),
    }
    if not global_top:
        send_rows = tuple(range(first, first + above))
        groups["send"] = ({"torch": lambda: x.narrow(-2, 0, above).contiguous(),
                           "xdit_op": lambda: _take_rows(x, send_rows, first)},
                          2 * above * row_bytes)
    return groups


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)
    missing = common.native_gpu_missing("bench_gather_rows")
    if missing:
        print(missing, file=sys.stderr)
        return 2
    warmup, iters, rounds = common.iters_of(args)
    dtype = getattr(torch, args.dtype)
    dev = torch.device("cuda")
    copy_bw = copy_gbps(dev, warmup, iters)
    torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(dev)
    nominal = next((v for k, v in NOMINAL_GBPS.items() if name.startswith(k)), None)

    rows = []
    for case, lead, band, width, above, own in CASES:
        for global_top in (False, True):
            x, first, lo, hi, h_total, received = make_case(lead, band, width, above, own, dtype,
                                                            dev, global_top=global_top)
            groups = candidates(x, first, lo, hi, h_total, received, above, global_top)
            for kind, (fns, nbytes) in groups.items():
                exact = bool(torch.equal(fns["xdit_op"](), fns["torch"]()))
                timings = common.bench_interleaved(
                    fns, warmup=warmup, iters=iters, rounds=rounds, cold_l2=args.cold_l2,
                    cuda_graph=args.cuda_graph, device=dev)
                base_ms = timings["torch"].median_ms
                for impl, t in timings.items():
                    gb = common.gbps(nbytes, t.median_ms)
                    rows.append({
                        "case": case + ("_globaltop" if global_top else ""), "op": kind,
                        "impl": impl,
                        "shape": [*lead, hi - lo if kind == "slab" else above, width],
                        "dtype": args.dtype, "ms": t.median_ms, "gbps": gb, "bytes": nbytes,
                        "of_copy_bw": gb / copy_bw,
                        "of_nominal_peak": gb / nominal if nominal else None,
                        "speedup_vs_torch": base_ms / t.median_ms,
                        "bit_exact_vs_torch": exact, "timing": t,
                    })
            torch.cuda.empty_cache()
    path = common.write_json("bench_gather_rows", rows, args.out, extra={
        "warmup": warmup, "iters": iters, "rounds": rounds, "cold_l2": args.cold_l2,
        "cuda_graph": args.cuda_graph, "copy_gbps_1GiB": copy_bw, "nominal_gbps": nominal})
    common.print_table(rows, ["case", "op", "impl", "ms", "gbps", "of_copy_bw",
                              "speedup_vs_torch", "bit_exact_vs_torch"])
    print(f"copy_ 1 GiB: {copy_bw:.0f} GB/s; nominal {nominal} GB/s ({name})")
    print(f"wrote {path}")
    return 0 if all(r["bit_exact_vs_torch"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
