"""gather_rows: rows of several tensors and fill rows into one tensor (the VAE halo packing).

The CPU kernel is checked against a row-by-row loop; the CUDA kernel against the CPU kernel, bit
for bit (a copy is exact), over every access width the kernel picks (16, 8, 4, 2 bytes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.utils import randn
from xdit_ops.ops.gather_rows import MAX_SOURCES, gather_rows, gather_rows_ref


def naive_gather(sources, index, fill):
    """Row by row: the definition of the op."""
    s0 = sources[0]
    rows = []
    for s, r in index.tolist():
        if s < 0:
            rows.append(torch.full((*s0.shape[:-2], s0.shape[-1]), fill, dtype=s0.dtype,
                                   device=s0.device))
        else:
            rows.append(sources[s][..., r, :])
    return torch.stack(rows, dim=-2)


def random_index(heights, n, *, seed=0, index_dtype=torch.int32, fill_prob=0.25):
    """A random CPU [n, 2] index into sources of the given heights, about ``fill_prob`` of its
    rows fill rows (whose row entry is left random: the op must ignore it)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, len(heights), (n,), generator=g)
    row = torch.stack([torch.randint(0, heights[s], (1,), generator=g)[0] for s in src.tolist()])
    src[torch.rand(n, generator=g) < fill_prob] = -1
    return torch.stack([src, row], dim=1).to(index_dtype)


def random_case(lead, heights, width, n, *, dtype=torch.float32, device="cpu", seed=0,
                index_dtype=torch.int32, narrow=True):
    """Sources of the given heights (narrow views of taller tensors when ``narrow``) and a
    random index into them."""
    sources = []
    for k, h in enumerate(heights):
        if narrow:
            base = randn(*lead, h + 5, width, dtype=dtype, device=device, seed=seed * 31 + k)
            sources.append(base.narrow(-2, 2, h))
        else:
            sources.append(randn(*lead, h, width, dtype=dtype, device=device, seed=seed * 31 + k))
    return sources, random_index(heights, n, seed=seed, index_dtype=index_dtype)


# ------------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(2, 3), (1, 2, 3)], ids=["4d", "5d"])
@pytest.mark.parametrize("heights", [(7,), (4, 9), (1, 6, 3)], ids=["1src", "2src", "3src"])
def test_cpu_matches_row_loop(dtype, lead, heights):
    sources, index = random_case(lead, heights, 13, 17, dtype=dtype, seed=len(heights))
    out = gather_rows(sources, index, fill=0.75)
    ref = naive_gather(sources, index, 0.75)
    assert out.shape == (*lead, 17, 13) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, ref)


def test_cpu_int64_index_fill_only_and_empty():
    sources, index = random_case((2, 2), (5, 3), 6, 9, index_dtype=torch.int64, seed=3)
    assert torch.equal(gather_rows(sources, index, -2.5), naive_gather(sources, index, -2.5))
    fill_only = torch.tensor([[-1, 0], [-3, 7]], dtype=torch.int32)
    out = gather_rows(sources, fill_only, float("inf"))
    assert torch.equal(out, torch.full((2, 2, 2, 6), float("inf")))
    empty = gather_rows(sources, torch.zeros(0, 2, dtype=torch.int32))
    assert empty.shape == (2, 2, 0, 6)


def test_cpu_fill_is_rounded_like_fill_():
    x = randn(1, 3, 4, dtype=torch.bfloat16, seed=1)
    out = gather_rows([x], torch.tensor([[-1, 0]], dtype=torch.int32), fill=0.1)
    assert torch.equal(out, torch.empty(1, 1, 4, dtype=torch.bfloat16).fill_(0.1))


def test_bad_arguments():
    x = randn(2, 5, 4, seed=1)
    idx = torch.tensor([[0, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="gather_rows: needs at least one source"):
        gather_rows([], idx)
    with pytest.raises(ValueError, match=f"gather_rows: at most {MAX_SOURCES} sources, got 9"):
        gather_rows([x] * 9, idx)
    with pytest.raises(TypeError, match="gather_rows: source 1 is torch.float64"):
        gather_rows([x, x.double()], idx)
    with pytest.raises(ValueError, match="gather_rows: source 1 .* does not match source 0"):
        gather_rows([x, randn(3, 5, 4, seed=2)], idx)
    with pytest.raises(ValueError, match="gather_rows: source 1 .* does not match source 0"):
        gather_rows([x, randn(2, 5, 3, seed=2)], idx)
    with pytest.raises(TypeError, match="gather_rows: unsupported dtype torch.int32"):
        gather_rows([x.int()], idx)
    with pytest.raises(ValueError, match=r"gather_rows: index must be \[n, 2\]"):
        gather_rows([x], torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="gather_rows: index must be int32 or int64"):
        gather_rows([x], idx.float())
    with pytest.raises(IndexError, match="gather_rows: index row 1 names source 2 but there are 2"):
        gather_rows([x, x], torch.tensor([[0, 0], [2, 0]]))
    with pytest.raises(IndexError, match="gather_rows: index row 0 reads row 5 of source 0"):
        gather_rows([x], torch.tensor([[0, 5]]))
    with pytest.raises(IndexError, match="gather_rows: index row 0 reads row -1 of source 0"):
        gather_rows([x], torch.tensor([[0, -1]]))


def test_opcheck():
    sources, index = random_case((2, 3), (4, 6), 8, 11, seed=5)
    torch.library.opcheck(torch.ops.xdit_ops.gather_rows.default, (sources, index, 1.5))


def _compiled_fn(a, b, index):
    return gather_rows([a * 2, b], index, 3.0) + 1


def test_compile_fullgraph_equals_eager():
    sources, index = random_case((2, 3), (4, 6), 8, 11, seed=6, narrow=False)
    eager = _compiled_fn(*sources, index)
    compiled = torch.compile(_compiled_fn, fullgraph=True, backend="aot_eager")(*sources, index)
    assert torch.equal(compiled, eager)


NO_EXTENSION = textwrap.dedent(
    """
    import torch
    import xdit_ops
    from xdit_ops import _extension
    from xdit_ops.ops.gather_rows import gather_rows

    assert not _extension.has("_C")
    # Without the native module CUDA tensors take the reference kernel.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("xdit_ops::gather_rows", "CUDA")
    x = torch.arange(12.0).reshape(1, 3, 4)
    out = gather_rows([x], torch.tensor([[0, 2], [-1, 0], [0, 0]], dtype=torch.int32), 9.0)
    assert out.tolist() == [[[8.0, 9.0, 10.0, 11.0], [9.0] * 4, [0.0, 1.0, 2.0, 3.0]]]
    print("gather-rows-cpu-ok")
    """
)


def test_cpu_path_without_extension():
    env = dict(os.environ, XDIT_OPS_DISABLE_EXTENSION="1")
    res = subprocess.run([sys.executable, "-c", NO_EXTENSION], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "gather-rows-cpu-ok" in res.stdout


# ------------------------------------------------------------------------------------------- GPU


def _native():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("xdit_ops::gather_rows", "CUDA")
    import xdit_ops._extension as ext

    assert ext.has("_C"), ext.reason("_C")


def _check_cuda_equals_cpu(sources, index, fill, *, device_index=True):
    cpu = gather_rows([s.cpu() for s in sources], index.cpu(), fill)
    out = gather_rows(sources, index.cuda() if device_index else index.cpu(), fill)
    torch.cuda.synchronize()
    assert out.is_cuda and out.is_contiguous() and out.shape == cpu.shape
    assert torch.equal(out.cpu(), cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    ("width", "col_offset", "row_offset"),
    # Sources are views [..., row_offset:row_offset + h, col_offset:col_offset + width] of
    # contiguous tensors (read in place). 64 columns: 16-byte accesses; 37: odd rows (2/4/8-byte
    # elements); 32 columns 4 in: rows of 64+ bytes on a start and stride that are only 8 (bf16,
    # fp16) or 16 bytes aligned; 1 column; 520 columns: many vectors per row.
    [(64, 0, 2), (37, 0, 1), (32, 4, 3), (1, 0, 3), (520, 0, 0)],
)
def test_gpu_matches_cpu_exactly(dtype, width, col_offset, row_offset):
    _native()
    heights = (5, 9, 2)
    bases = [randn(2, 3, h + 4, width + col_offset, dtype=dtype, device="cuda", seed=h)
             for h in heights]
    sources = [b[..., row_offset:row_offset + h, col_offset:] for b, h in zip(bases, heights,
                                                                           strict=True)]
    index = random_index(heights, 40, seed=width)
    _check_cuda_equals_cpu(sources, index, -1.25)
    _check_cuda_equals_cpu(sources, index.long(), 0.5, device_index=False)


@pytest.mark.gpu
def test_gpu_5d_strided_and_noncollapsible_sources():
    _native()
    # A channel slice cannot flatten its leading dims into one stride: the launcher copies it.
    # The third also starts 3 columns in: 2-byte accesses.
    full = randn(2, 6, 3, 11, 48, dtype=torch.bfloat16, device="cuda", seed=1)
    sources = [full[:, 1:4, ..., :40], full[:, :3, :, 4:9, 8:48].contiguous(),
               full[:, 2:5, :, 5:11, 3:43]]
    index = random_index((11, 5, 6), 23, seed=2)
    _check_cuda_equals_cpu(sources, index, 7.0)
    # Expanded (stride-0) leading dims and a last dim with stride != 1.
    expanded = randn(1, 1, 9, 16, device="cuda", seed=3).expand(2, 4, 9, 16)
    transposed = randn(2, 4, 16, 9, device="cuda", seed=4).transpose(-1, -2)
    index = random_index((9, 9), 30, seed=5)
    _check_cuda_equals_cpu([expanded, transposed], index, 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("lead", "n", "width"),
    [
        ((1,), 3, 1 << 18),  # few long rows: columns split across blocks
        ((64, 21), 700, 104),  # many rows (a Wan video slab)
        ((1 << 12,), 4500, 2),  # 18.4M rows of 8 bytes: more rows than the grid (grid-stride)
    ],
    ids=["long_rows", "many_rows", "grid_stride"],
)
def test_gpu_large(lead, n, width):
    _native()
    dtype = torch.float32
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(*lead, 5, width, device="cuda", dtype=dtype, generator=g)
    b = torch.randn(*lead, 3, width, device="cuda", dtype=dtype, generator=g)
    src = torch.randint(-1, 2, (n,), device="cuda", generator=g)
    row = torch.randint(0, 3, (n,), device="cuda", generator=g)
    index = torch.stack([src, row], 1).int()
    out = gather_rows([a, b], index, 2.0)
    # The reference kernel evaluated on the GPU (index_select/index_copy_; the row loop would
    # take minutes here).
    assert torch.equal(out, gather_rows_ref([a, b], index, 2.0))


@pytest.mark.gpu
def test_gpu_errors_match_cpu():
    _native()
    x = randn(2, 5, 4, device="cuda", seed=1)
    with pytest.raises(IndexError, match="gather_rows: index row 0 reads row 5 of source 0"):
        gather_rows([x], torch.tensor([[0, 5]]))
    with pytest.raises(TypeError, match="gather_rows: source 1 is"):
        gather_rows([x, x.half()], torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="gather_rows: at most 8 sources, got 9"):
        gather_rows([x] * 9, torch.tensor([[0, 1]]))


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    _native()
    sources, index = random_case((2, 3), (6, 4), 128, 19, dtype=torch.bfloat16, device="cuda",
                                 seed=9)
    index = index.cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gather_rows(sources, index, 1.0)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gather_rows(sources, index, 1.0)
    for seed in (10, 11):  # the replay reads the sources' current contents
        for k, s in enumerate(sources):
            s.copy_(randn(*s.shape, dtype=s.dtype, device="cuda", seed=seed + 7 * k))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), naive_gather([s.cpu() for s in sources], index.cpu(), 1.0))
