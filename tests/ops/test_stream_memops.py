"""stream_memops / copy2d: stream-ordered flags and copy-engine 2-D copies (usp's overlap path).

CPU: the descriptor arithmetic of ``rows2d`` is checked by replaying the descriptors as byte
copies on the tensors' storage (what ``cudaMemcpy2DAsync`` does with them), and the argument
checks. GPU: the ops themselves, against torch copies and by stream order.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from tests.utils import randn
from xdit_ops.ops.stream_memops import (
    WAIT,
    WRITE,
    rows2d,
    run_copy2d,
    run_memops,
    word_address,
)


def _replay(descs):
    """Run copy2d descriptors on host memory, byte by byte per row (cudaMemcpy2D's meaning)."""
    for i in range(0, len(descs), 6):
        dst, dp, src, sp, w, rows = descs[i:i + 6]
        for row in range(rows):
            ctypes.memmove(dst + row * dp, src + row * sp, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
def test_rows2d_descriptors_copy_head_slices(B, dtype):
    L, H, hc, D = 7, 6, 2, 8
    src = randn(B, L, H, D, seed=1, dtype=dtype)
    # a head slice of a strided shard into rows of a contiguous buffer, and back into a wider row
    dst = torch.zeros(B, 3 + L, hc, D, dtype=dtype)
    descs = rows2d(dst[:, 3:], src[:, :, 2:4])
    assert len(descs) == 6 * B
    _replay(descs)
    assert torch.equal(dst[:, 3:], src[:, :, 2:4]) and not dst[:, :3].any()
    back = torch.zeros(B, L, H, D, dtype=dtype)
    _replay(rows2d(back[:, :, 4:6], dst[:, 3:]))
    assert torch.equal(back[:, :, 4:6], src[:, :, 2:4])
    assert not back[:, :, :4].any() and not back[:, :, 6:].any()


def test_rows2d_and_programs_refuse_bad_input():
    a = torch.zeros(2, 5, 4, 8)
    with pytest.raises(ValueError, match="copy2d: dst .* and src .* must match"):
        rows2d(a, a[:, :4])
    with pytest.raises(ValueError, match="copy2d: src of shape .* has no dense"):
        rows2d(torch.zeros(2, 5, 4, 4), a[:, :, :, ::2])
    with pytest.raises(ValueError, match="copy2d: tensors must be"):
        rows2d(a[0, 0], a[0, 0])
    with pytest.raises(ValueError, match="stream_memops: step 0 = .* is not a wait"):
        run_memops(a, [2, 64, 1])
    with pytest.raises(ValueError, match="stream_memops: step 1 = .* is not a wait"):
        run_memops(a, [WAIT, 64, 1, WRITE, 66, 1])
    with pytest.raises(ValueError, match="stream_memops: the program has 4 integers"):
        run_memops(a, [WAIT, 64, 1, 0])
    with pytest.raises(ValueError, match="copy2d: descriptor 0 = .* is not a valid 2-D copy"):
        run_copy2d(a, [64, 16, 128, 16, 32, 2])
    with pytest.raises(ValueError, match="stream_memops: flag word 3 of a torch.int32 tensor"):
        word_address(torch.zeros(3, dtype=torch.int32), 3)


@pytest.mark.gpu
def test_gpu_copy2d_matches_torch():
    B, L, H, hc, D = 2, 1031, 10, 5, 128
    src = randn(B, L, H, D, seed=2, dtype=torch.bfloat16, device="cuda")
    dst = torch.full((B, 77 + L, hc, D), float("nan"), dtype=src.dtype, device="cuda")
    run_copy2d(dst, rows2d(dst[:, 77:], src[:, :, hc:]))
    torch.cuda.synchronize()
    assert torch.equal(dst[:, 77:], src[:, :, hc:]) and dst[:, :77].isnan().all()


@pytest.mark.gpu
def test_gpu_flags_order_streams():
    """A side stream waits on a flag that the main stream writes only after a long kernel; the
    side stream's write after its wait must land after the main stream's, and a copy queued on
    the side stream after the wait must see the main stream's data."""
    f = torch.zeros(4, dtype=torch.int32, device="cuda")
    data = torch.zeros(1 << 20, device="cuda")
    seen = torch.empty_like(data)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    # The write is queued before the wait (run 41: the reverse order hung on the GPU machine: a
    # waiting stream blocks the hardware queue it shares with other streams, so on one device a
    # wait must never be queued ahead of the write it waits for; usp's overlap path queues
    # every same-device write before its wait).
    torch.cuda._sleep(50_000_000)  # ~tens of ms on the main stream before the data and flag
    data.fill_(3.0)
    run_memops(f, [WRITE, word_address(f, 0), 1])
    with torch.cuda.stream(side):
        run_memops(f, [WAIT, word_address(f, 0), 1, WRITE, word_address(f, 0), 0,
                       WRITE, word_address(f, 2), 5])
        seen.copy_(data)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert f.tolist() == [0, 0, 5, 0]
    assert bool((seen == 3.0).all())


@pytest.mark.gpu
def test_gpu_flags_in_a_cuda_graph():
    """Waits and writes replay from a CUDA graph (every usp overlap call is graph-capturable)."""
    f = torch.zeros(2, dtype=torch.int32, device="cuda")
    x = torch.zeros(8, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        run_memops(f, [WRITE, word_address(f, 1), 1])
        run_memops(f, [WAIT, word_address(f, 1), 1, WRITE, word_address(f, 1), 0])
        x.add_(1.0)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    assert f.tolist() == [0, 0] and x.tolist() == [3.0] * 8


def test_rebased_templates_follow_new_sources():
    """A plan's templates (rows2d at one call's tensors, sources as offsets) rebased onto another
    call's tensors give that call's descriptors, and they copy its data."""
    from xdit_ops.ops.stream_memops import rebased, template

    q, k = randn(2, 7, 6, 8, seed=3), randn(2, 7, 6, 8, seed=4)
    dst = torch.zeros(2, 2, 7, 2, 8)
    first = rows2d(dst[0], q[:, :, 2:4]) + rows2d(dst[1], k[:, :, 4:6])
    tmpl = template(rows2d(dst[0], q[:, :, 2:4]), q.data_ptr()) + \
        template(rows2d(dst[1], k[:, :, 4:6]), k.data_ptr())
    which = [0, 0, 1, 1]
    assert rebased(tmpl, which, [q.data_ptr(), k.data_ptr()]) == first
    q2, k2 = randn(2, 7, 6, 8, seed=5), randn(2, 7, 6, 8, seed=6)
    _replay(rebased(tmpl, which, [q2.data_ptr(), k2.data_ptr()]))
    assert torch.equal(dst[0], q2[:, :, 2:4]) and torch.equal(dst[1], k2[:, :, 4:6])
