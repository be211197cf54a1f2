# ruff: noqa
# Run 35 diag: the FP8-wire GPU test's cases and CUDA-graph check per rank under torchrun,
# every exception printed at once, stacks dumped if a phase stalls.
import faulthandler, os, sys, traceback
sys.path.insert(0, os.environ["SRC"])
import torch
rank = int(os.environ["RANK"]); world = int(os.environ["WORLD_SIZE"])
torch.cuda.set_device(rank)
import xdit_ops
import tests.ops.test_usp_fp8_wire as T
for impl in sys.argv[1:]:
    os.environ["XDIT_OPS_FP8_IMPL"] = impl
    for phase in ("cases", "graph"):
        faulthandler.dump_traceback_later(70, exit=True)
        try:
            if phase == "cases":
                T._worker(rank, world, "cuda", T.GPU_CASES)
            else:
                os.environ["XDIT_OPS_USP_FP8_WIRE"] = "1"
                xdit_ops.init_parallel(ulysses_degree=world)
                T._graph_check(rank)
                xdit_ops.destroy_parallel()
            print(f"rank {rank} impl {impl} {phase} OK", flush=True)
        except BaseException:
            print(f"rank {rank} impl {impl} {phase} FAILED", flush=True)
            traceback.print_exc(); sys.stdout.flush(); sys.stderr.flush()
            os._exit(3)
        faulthandler.cancel_dump_traceback_later()
print(f"rank {rank} all done", flush=True)
