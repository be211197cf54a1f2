"""Patch-parallel VAE decode (parallelize_vae) on N GPUs against one GPU, in one torchrun job.

# xdit-bench: torchrun

Real-size diffusers VAEs with random weights, bf16:

* Flux / SD3 ``AutoencoderKL`` (16 latent channels, 128-256-512-512): decode of 2048^2 and
  4096^2 images (``--quick``: 1024^2).
* Wan 2.1 ``AutoencoderKLWan`` (base 96, z 16): decode of 81 frames at 832x480 and 1280x720
  (``--quick``: 9 frames at 832x480).

Rank 0 first decodes serially on its own GPU (the baseline; skipped with a note when it runs out
of memory), then every rank decodes its row band. Each row reports: latency (median of timed
decodes, the slowest rank's), peak memory per GPU (``max_memory_allocated`` after a reset; the
``act`` figures subtract what was allocated before the decode: weights and input), error of the
parallel decode against the serial bf16 decode from the same process, and parallel efficiency
T1 / (N * TN).

    python benchmarks/bench_vae.py [--quick] [--out DIR]                    # serial only
    torchrun --nproc-per-node=4 benchmarks/bench_vae.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import add_common_args, parallel_efficiency, print_table, write_json  # noqa: E402

import xdit_ops  # noqa: E402


def flux_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def wan21_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                            temperal_downsample=[False, True, True])


def tiny_kl():
    from diffusers import AutoencoderKL

    return AutoencoderKL(latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         layers_per_block=1, norm_num_groups=4)


def tiny_wan():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1)


def cases(quick: bool, tiny: bool) -> list[tuple[str, callable, tuple[int, ...]]]:
    """(name, constructor, latent shape)."""
    if tiny:  # a smoke run of this script on CPU (gloo): --device cpu --tiny
        return [("tiny_kl", tiny_kl, (1, 4, 9, 8)), ("tiny_wan", tiny_wan, (1, 4, 2, 9, 8))]
    if quick:
        return [
            ("flux_vae_1024", flux_vae, (1, 16, 128, 128)),
            ("wan21_vae_9f_832x480", wan21_vae, (1, 16, 3, 60, 104)),
        ]
    return [
        # beyond one GPU: serial needs ~4x the 4096^2 peak (38 GB); run only when named (--case)
        ("flux_vae_8192", flux_vae, (1, 16, 1024, 1024)),
        ("flux_vae_2048", flux_vae, (1, 16, 256, 256)),
        ("flux_vae_4096", flux_vae, (1, 16, 512, 512)),
        ("wan21_vae_81f_832x480", wan21_vae, (1, 16, 21, 60, 104)),
        ("wan21_vae_81f_1280x720", wan21_vae, (1, 16, 21, 90, 160)),
    ]


ON_REQUEST = ("flux_vae_8192",)


def _decode(vae, z: torch.Tensor) -> torch.Tensor:
    return vae.decode(z).sample


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, iters: int, dev: torch.device, group=None) -> tuple[object, float, list[float]]:
    """Run ``fn`` iters times (after the peak-memory call, which warmed it up); per-call wall ms,
    the slowest rank's when in a group."""
    out = None
    samples = []
    for _ in range(iters):
        if group is not None:
            dist.barrier(group=group)
        _sync(dev)
        t0 = time.perf_counter()
        out = fn()
        _sync(dev)
        ms = torch.tensor((time.perf_counter() - t0) * 1e3, device=dev)
        if group is not None:
            dist.all_reduce(ms, op=dist.ReduceOp.MAX, group=group)
        samples.append(ms.item())
    return out, statistics.median(samples), samples


def peak_of(fn, dev: torch.device) -> tuple[object, float | None, float | None]:
    """(result, peak GiB, peak GiB above what was allocated before) of one call."""
    if dev.type != "cuda":
        return fn(), None, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return out, peak / 2**30, (peak - before) / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p)
    p.add_argument("--case", action="append", help="only these case names")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny VAEs (smoke run, CPU works)")
    p.add_argument("--fp32-ref", action="store_true",
                   help="also decode serially in fp32 on rank 0 (slow) and report the serial "
                        "and parallel bf16 errors against it: the bf16-noise yardstick")
    p.add_argument("--skip-serial", action="store_true",
                   help="no serial decode on rank 0 (for sizes known not to fit one GPU: the "
                        "serial attempt at 8192^2 took 100 s to run out of memory in run 15)")
    p.add_argument("--profile", action="store_true",
                   help="print rank 0's top CUDA-time ops of one parallel decode")
    args = p.parse_args()
    # decodes take 0.1-15 s: a few timed calls each (--iters caps the common default of 100)
    iters = 2 if args.quick else max(1, min(args.iters, 5))

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        xdit_ops.init_parallel(ulysses_degree=world, device_type=args.device)
        rank = dist.get_rank()
        group = xdit_ops.get_parallel_state().sp_group
    else:
        rank, group = 0, None
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dev, name_gpu, dtype = torch.device("cuda"), torch.cuda.get_device_name(), torch.bfloat16
    else:
        dev, name_gpu, dtype = torch.device("cpu"), "cpu", torch.float32
    rows = []
    for name, make, zshape in cases(args.quick, args.tiny):
        if (args.case and name not in args.case) or (name in ON_REQUEST and not args.case):
            continue
        torch.manual_seed(0)
        vae = make().to(dev, dtype).eval()
        unpatched_state = {k: v.detach().cpu() for k, v in vae.state_dict().items()} \
            if args.fp32_ref else None
        g = torch.Generator(device="cpu").manual_seed(1)
        z = torch.randn(zshape, generator=g).to(dev, dtype)
        dec = functools.partial(_decode, vae, z)
        row = {"case": name, "world": world, "gpu": name_gpu, "latent": list(zshape),
               "dtype": str(dtype).replace("torch.", ""), "note": ""}
        serial = None
        with torch.no_grad():
            if rank == 0 and args.skip_serial:
                row["note"] = "serial decode not attempted (--skip-serial)"
            elif rank == 0:
                try:
                    serial, row["serial_peak_gib"], row["serial_act_gib"] = peak_of(
                        dec, dev)
                    _, row["serial_ms"], _ = timed(dec, iters, dev)
                except torch.OutOfMemoryError:
                    serial = None
                    row["note"] = "serial decode ran out of memory on one GPU"
                    torch.cuda.empty_cache()
            if world > 1:
                dist.barrier()
                # per-frame CUDA graphs on (the default): timed below with and without them
                xdit_ops.parallelize_vae(vae, group=group, frame_graphs=True)
                try:
                    out, peak, act = peak_of(dec, dev)
                    _, row["parallel_ms"], row["parallel_samples_ms"] = timed(
                        dec, iters, dev, group)
                    oom = False
                except torch.OutOfMemoryError:
                    oom, peak, act, out = True, float("nan"), float("nan"), None
                    torch.cuda.empty_cache()
                graphs = getattr(vae, "_xdit_frame_graphs", None)
                if graphs is not None and not oom:
                    # the same decode without the per-frame CUDA graphs, in the same run
                    row["frame_graph_captures"] = graphs.captures
                    row["frame_graph_replays"] = graphs.replays
                    graphs.enabled = False
                    _, row["parallel_eager_ms"], _ = timed(dec, iters, dev, group)
                    graphs.enabled = True
                peaks = [None] * world
                dist.all_gather_object(peaks, (peak, act, oom), group=group)
                row["parallel_peak_gib_per_rank"] = [x[0] for x in peaks]
                row["parallel_act_gib_per_rank"] = [x[1] for x in peaks]
                if any(x[2] for x in peaks):
                    row["note"] += "; parallel decode ran out of memory on some rank"
                if args.profile and out is not None:
                    from torch.profiler import ProfilerActivity, profile

                    dist.barrier(group=group)
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        dec()
                        _sync(dev)
                    if rank == 0:
                        print(f"--- profile of one parallel decode, {name}, rank 0 ---")
                        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
                if rank == 0 and out is not None:
                    row["out_shape"] = list(out.shape)
                    if serial is not None:
                        d = (out.float() - serial.float())
                        row["max_rel_err_vs_serial"] = (d.abs().max()
                                                        / serial.float().abs().max()).item()
                        row["rel_l2_err_vs_serial"] = (d.norm() / serial.float().norm()).item()
                        if row["serial_act_gib"]:
                            row["act_ratio_vs_serial"] = (
                                max(row["parallel_act_gib_per_rank"]) / row["serial_act_gib"])
                        if "parallel_ms" in row:
                            row["speedup"] = row["serial_ms"] / row["parallel_ms"]
                            row["parallel_efficiency"] = parallel_efficiency(
                                row["serial_ms"], world, row["parallel_ms"])
                if args.fp32_ref and rank == 0 and out is not None and serial is not None:
                    # The yardstick of "within bf16 noise": how far serial bf16 is from fp32.
                    try:
                        vae32 = make().to(dev, torch.float32).eval()
                        vae32.load_state_dict(
                            {k: v.float() for k, v in unpatched_state.items()})
                        ref32 = _decode(vae32, z.float()).float()
                        del vae32
                        for key, t in (("serial", serial), ("parallel", out)):
                            d = t.float() - ref32
                            row[f"{key}_rel_l2_vs_fp32"] = (d.norm() / ref32.norm()).item()
                            row[f"{key}_max_rel_vs_fp32"] = (d.abs().max()
                                                             / ref32.abs().max()).item()
                        del ref32
                    except torch.OutOfMemoryError:
                        row["note"] += "; fp32 reference ran out of memory"
                        torch.cuda.empty_cache()
                del out
        del serial, vae, z, dec
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if rank == 0:
            rows.append(row)
            print({k: v for k, v in row.items() if k != "parallel_samples_ms"}, flush=True)
    if rank == 0:
        path = write_json("bench_vae", rows, args.out,
                          extra={"command": " ".join([sys.executable] + sys.argv)})
        print_table(rows, ["case", "world", "serial_ms", "parallel_ms", "parallel_eager_ms",
                           "speedup",
                           "parallel_efficiency", "serial_act_gib", "act_ratio_vs_serial",
                           "max_rel_err_vs_serial", "note"])
        print(f"wrote {path}")
    if world > 1:
        xdit_ops.destroy_parallel()


if __name__ == "__main__":
    main()
