"""stream_memops / copy2d: stream-ordered flags and copy-engine 2-D copies (usp's overlap path).

CPU: the descriptor arithmetic of ``rows2d`` is checked by replaying the descriptors as byte
copies on the tensors' storage (what ``cudaMemcpy2DAsync`` does with them), and the argument
checks. GPU: the ops themselves, against torch copies and by stream order.
"""

from __future__ import annotations

import pytest
import torch

from tests.utils import randn, replay_copy2d
from xdit_ops.ops.stream_memops import (
    WAIT,
    WRITE,
    copy2d_template,
    program_tensor,
    rebased,
    rows2d,
    run_copy2d,
    run_copy2d_t,
    run_memops,
    run_memops_t,
    template,
    word_address,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
def test_rows2d_descriptors_copy_head_slices(B, dtype):
    L, H, hc, D = 7, 6, 2, 8
    src = randn(B, L, H, D, seed=1, dtype=dtype)
    # a head slice of a strided shard into rows of a contiguous buffer, and back into a wider row
    dst = torch.zeros(B, 3 + L, hc, D, dtype=dtype)
    descs = rows2d(dst[:, 3:], src[:, :, 2:4])
    assert len(descs) == 6 * B
    replay_copy2d(descs)
    assert torch.equal(dst[:, 3:], src[:, :, 2:4]) and not dst[:, :3].any()
    back = torch.zeros(B, L, H, D, dtype=dtype)
    replay_copy2d(rows2d(back[:, :, 4:6], dst[:, 3:]))
    assert torch.equal(back[:, :, 4:6], src[:, :, 2:4])
    assert not back[:, :, :4].any() and not back[:, :, 6:].any()


def test_rows2d_one_head_of_a_transposed_output():
    """One head of attention's output, a transposed [B, 1, rows, D] (its head stride is the
    batch pitch): rows of D contiguous elements, copied as such (an overlap chunk of one head
    failed here in the CPU simulation of test_usp_host_path)."""
    B, rows, D = 2, 9, 8
    o = randn(B, 1, rows, D, seed=3).transpose(1, 2)  # [B, rows, 1, D], strides (72, 8, 72, 1)
    assert o.stride(-2) != D and o.is_contiguous()  # contiguous() would not change it
    out = torch.zeros(B, rows, 5, D)
    replay_copy2d(rows2d(out[:, :, 3:4], o))
    assert torch.equal(out[:, :, 3:4], o) and out[:, :, 3].count_nonzero() == out.count_nonzero()


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


@pytest.mark.parametrize("rebase", ["python", "copy2d_t"])
def test_rebased_templates_follow_new_sources(rebase):
    """A plan's templates (rows2d at one call's tensors, sources as offsets) rebased onto another
    call's tensors give that call's descriptors, and they copy its data: in Python
    (``rebased``, the list host path) and in C++ (``copy2d_t``'s host-memory kernel, the tensor
    host path; which source per descriptor)."""
    q, k = randn(2, 7, 6, 8, seed=3), randn(2, 7, 6, 8, seed=4)
    dst = torch.zeros(2, 2, 7, 2, 8)
    first = rows2d(dst[0], q[:, :, 2:4]) + rows2d(dst[1], k[:, :, 4:6])
    tmpl = template(rows2d(dst[0], q[:, :, 2:4]), q.data_ptr()) + \
        template(rows2d(dst[1], k[:, :, 4:6]), k.data_ptr())
    which = [0, 0, 1, 1]
    assert rebased(tmpl, which, [q.data_ptr(), k.data_ptr()]) == first
    q2, k2 = randn(2, 7, 6, 8, seed=5), randn(2, 7, 6, 8, seed=6)
    bases = [q2.data_ptr(), k2.data_ptr()]
    if rebase == "python":
        replay_copy2d(rebased(tmpl, which, bases))
    else:
        t, w = copy2d_template(tmpl, which)
        assert t.tolist() == tmpl and w.tolist() == which
        run_copy2d_t(dst, t, w, bases)
    assert torch.equal(dst[0], q2[:, :, 2:4]) and torch.equal(dst[1], k2[:, :, 4:6])


def test_copy2d_t_absolute_descriptors_on_host():
    """copy2d_t without ``which``: the descriptors are absolute and copy as given."""
    src = randn(2, 7, 2, 8, seed=5)
    back = torch.zeros(2, 7, 6, 8)
    run_copy2d_t(back, *copy2d_template(rows2d(back[:, :, 2:4], src)))
    assert torch.equal(back[:, :, 2:4], src) and not back[:, :, :2].any() and \
        not back[:, :, 4:].any()


# ---------------------------------------------------------------------------------------------
# the tensor ops (stream_memops_t, copy2d_t): programs / descriptors as per-plan CPU tensors


def test_program_tensor_is_the_checked_list():
    prog = [WAIT, 64, 1, WRITE, 64, 0, WRITE, 128, 7]
    t = program_tensor(prog)
    assert t.dtype == torch.int64 and t.device.type == "cpu" and t.tolist() == prog
    with pytest.raises(ValueError, match="stream_memops: step 1 = .* is not a wait"):
        program_tensor([WAIT, 64, 1, WRITE, 66, 1])
    a = torch.zeros(4)
    with pytest.raises(ValueError, match="stream_memops_t: need a contiguous 1-D CPU int64 "
                                         "tensor, got torch.int32"):
        run_memops_t(a, t.int())
    with pytest.raises(ValueError, match="stream_memops_t: need a contiguous 1-D CPU int64"):
        run_memops_t(a, torch.tensor(prog + prog)[::2])


def test_copy2d_t_refuses_bad_input():
    a = torch.zeros(2, 5, 4, 8)
    good = rows2d(a[:, :, :2], a[:, :, 2:])
    with pytest.raises(ValueError, match="copy2d: descriptor 0 = .* is not a valid 2-D copy"):
        copy2d_template([64, 16, 128, 16, 32, 2])
    with pytest.raises(ValueError, match="copy2d: 1 source indices for 2 descriptors"):
        copy2d_template(good, [0])
    with pytest.raises(ValueError, match="copy2d: 2 source indices .* one index >= 0"):
        copy2d_template(good, [0, -1])
    t, w = copy2d_template(good, [0, 1])
    with pytest.raises(ValueError, match=r"copy2d_t: source indices \[0, 1\] for 2 descriptors "
                                         "and 1 bases"):
        run_copy2d_t(a, t, w, [0])
    with pytest.raises(ValueError, match="copy2d_t: need a contiguous 1-D CPU int64 tensor"):
        run_copy2d_t(a, t.view(2, 6), w, [0, 0])
    # the C++ backstops (the op called past the wrapper): they raise, name the op and value
    op = torch.ops.xdit_ops.copy2d_t.default
    with pytest.raises(RuntimeError, match="copy2d_t: descriptor 1 names source 1 of 1"):
        op(a, t, torch.tensor([0, 1]), [0], -1)
    with pytest.raises(RuntimeError, match="copy2d_t: 1 source indices for 2 descriptors"):
        op(a, t, torch.tensor([0]), [0, 0], -1)
    with pytest.raises(RuntimeError, match="copy2d_t: descs must be a contiguous 1-D CPU int64"):
        op(a, t.int(), torch.tensor([0, 0]), [0, 0], -1)
    with pytest.raises(RuntimeError, match="copy2d_t: descriptor 0 .* is not a valid 2-D copy"):
        op(a, torch.tensor([64, 16, 128, 16, 32, 2]), torch.tensor([], dtype=torch.int64), [],
           -1)
    with pytest.raises(RuntimeError, match="copy2d_t: on the CPU the anchor must be a CPU "
                                           "tensor and stream -1"):
        op(a, t, torch.tensor([], dtype=torch.int64), [], 5)


@pytest.mark.gpu
def test_gpu_copy2d_t_matches_torch():
    """copy2d_t on the GPU: a rebased template (2-D copies) and a one-row run (the ring's
    pull), on a side stream passed by handle (not made current)."""
    B, L, H, hc, D = 2, 1031, 10, 5, 128
    src = randn(B, L, H, D, seed=2, dtype=torch.bfloat16, device="cuda")
    dst = torch.full((B, 77 + L, hc, D), float("nan"), dtype=src.dtype, device="cuda")
    t, w = copy2d_template(template(rows2d(dst[:, 77:], src[:, :, hc:]), src.data_ptr()),
                           [0] * B)
    src2 = randn(B, L, H, D, seed=3, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    run_copy2d_t(dst, t, w, [src2.data_ptr()], stream=side.cuda_stream)
    flat = torch.empty_like(src2)
    n = src2.numel() * src2.element_size()
    run_copy2d_t(dst, *copy2d_template([flat.data_ptr(), n, src2.data_ptr(), n, n, 1]),
                 stream=side.cuda_stream)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(dst[:, 77:], src2[:, :, hc:]) and dst[:, :77].isnan().all()
    assert torch.equal(flat, src2)


@pytest.mark.gpu
def test_gpu_memops_t_order_streams():
    """test_gpu_flags_order_streams with tensor programs, the side stream's passed by handle."""
    f = torch.zeros(4, dtype=torch.int32, device="cuda")
    data = torch.zeros(1 << 20, device="cuda")
    seen = torch.empty_like(data)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda._sleep(50_000_000)
    data.fill_(3.0)
    run_memops_t(f, program_tensor([WRITE, word_address(f, 0), 1]))
    run_memops_t(f, program_tensor([WAIT, word_address(f, 0), 1, WRITE, word_address(f, 0), 0,
                                    WRITE, word_address(f, 2), 5]), stream=side.cuda_stream)
    n = data.numel() * 4
    run_copy2d_t(f, *copy2d_template([seen.data_ptr(), n, data.data_ptr(), n, n, 1]),
                 stream=side.cuda_stream)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert f.tolist() == [0, 0, 5, 0]
    assert bool((seen == 3.0).all())


@pytest.mark.gpu
@pytest.mark.parametrize("batched", [True, False])
def test_gpu_memops_t_in_a_cuda_graph(batched):
    """Tensor programs on a capturing side stream (by handle) replay from a CUDA graph."""
    f = torch.zeros(2, dtype=torch.int32, device="cuda")
    x = torch.zeros(8, device="cuda")
    y = torch.zeros(8, device="cuda")
    s = torch.cuda.Stream()
    s2 = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    set1 = program_tensor([WRITE, word_address(f, 1), 1])
    wait1 = program_tensor([WAIT, word_address(f, 1), 1, WRITE, word_address(f, 1), 0])
    n = x.numel() * 4
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        x.add_(1.0)
        run_memops_t(f, set1, batched)
        s2.wait_stream(s)
        run_memops_t(f, wait1, batched, stream=s2.cuda_stream)
        run_copy2d_t(f, *copy2d_template([y.data_ptr(), n, x.data_ptr(), n, n, 1]),
                     stream=s2.cuda_stream)
        s.wait_stream(s2)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    assert f.tolist() == [0, 0] and x.tolist() == [3.0] * 8 and y.tolist() == [3.0] * 8
