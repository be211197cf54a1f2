"""ulysses_pack_qkv / ulysses_place_gathered / ulysses_unpack_out: exact copies of the
usp_attention exchange layouts.

The oracles are independent of the ops' torch references in ``xdit_ops.ops.ulysses_pack``:
``_ulysses_in_send`` and ``_ulysses_out_place`` are the torch copies ``usp_attention._ulysses_in``
(send buffer) and ``_ulysses_out`` (placement of what was received) made before these ops, all
branches; ``_place_oracle`` builds the query and K/V buffers by concatenation, written from the
layout rather than copied from ``_place_cpu`` (a copy would test that reference against itself).
"""

from __future__ import annotations

import pytest
import torch

from tests.utils import capture_cuda_graph, randn
from xdit_ops.ops.ulysses_pack import (
    ulysses_pack_qkv,
    ulysses_place_gathered,
    ulysses_push_out,
    ulysses_push_out_blocks,
    ulysses_push_qkv,
    ulysses_unpack_out,
)

HEADS = {"even": [2, 2, 2], "uneven": [8, 8, 7, 7]}


def _ulysses_in_send(q_s, k_s, v_s, heads):
    """The send buffer of ``_ulysses_in`` (flat)."""
    B, L, H, D = q_s.shape
    U = len(heads)
    starts = [sum(heads[:i]) for i in range(U)]
    if all(h == heads[0] for h in heads):
        h = heads[0]
        send = torch.stack([t.reshape(B, L, U, h, D).permute(2, 0, 1, 3, 4)
                            for t in (q_s, k_s, v_s)], dim=1)
    else:
        send = q_s.new_empty(3 * B * L * H * D)
        off = 0
        for j in range(U):
            n = 3 * B * L * heads[j] * D
            view = send[off:off + n].view(3, B, L, heads[j], D)
            for i, t in enumerate((q_s, k_s, v_s)):
                view[i].copy_(t[:, :, starts[j]:starts[j] + heads[j]])
            off += n
    return send.reshape(-1)


def _place_oracle(recv, U, B, L, h, q_j, k_j, v_j, head_start, J, Jk):
    """Per tensor: this rank's heads of the joint rows (when any), then the U received shards'
    L rows in rank order; K and V stacked."""
    D = recv.numel() // (U * 3 * B * L * h)
    g = recv.view(U, 3, B, L, h, D)
    hs = slice(head_start, head_start + h)

    def rows(t, joint, n):
        seq = torch.cat([g[u, t] for u in range(U)], dim=1)  # [B, U*L, h, D]
        return torch.cat([joint[:, :, hs], seq], dim=1) if n else seq

    return rows(0, q_j, J), torch.stack([rows(1, k_j, Jk), rows(2, v_j, Jk)])


def _place_case(U, B, L, h, H, D, J, dtype=torch.float32, device="cpu", seed=0):
    """A received buffer and joint q/k/v as strided views of a fused [B, J, 3, H, D] tensor."""
    recv = randn(U * 3 * B * L * h * D, dtype=dtype, device=device, seed=seed)
    if not J:
        return recv, (None, None, None)
    joint = randn(B, J, 3, H, D, dtype=dtype, device=device, seed=seed + 1).unbind(2)
    return recv, joint


def _ulysses_out_place(recv, heads, B, J, L, joint_front):
    """What ``_ulysses_out`` builds from the received buffer."""
    U = len(heads)
    H = sum(heads)
    D = recv.numel() // (B * (J + L) * H)
    even = all(h == heads[0] for h in heads)
    out = recv.new_empty(B, J + L, H, D)
    rows_joint = slice(0, J) if joint_front else slice(L, L + J)
    rows_seq = slice(J, J + L) if joint_front else slice(0, L)
    if even:
        h = heads[0]
        src = recv.view(U, B, J + L, h, D).permute(1, 2, 0, 3, 4)  # [B, J+L, U, h, D]
        dst = out.view(B, J + L, U, h, D)
        if joint_front or not J:
            dst.copy_(src)
        else:
            dst[:, rows_joint].copy_(src[:, :J])
            dst[:, rows_seq].copy_(src[:, J:])
        return out
    off = 0
    start = 0
    for hi in heads:
        n = B * (J + L) * hi * D
        piece = recv[off:off + n].view(B, J + L, hi, D)
        if J:
            out[:, rows_joint, start:start + hi] = piece[:, :J]
        out[:, rows_seq, start:start + hi] = piece[:, J:]
        off += n
        start += hi
    return out


def _fused_qkv(B, L, H, D, dtype=torch.float32, device="cpu", seed=0):
    """q, k, v as slices of a fused projection output [B, L, 3, H, D] (not contiguous)."""
    qkv = randn(B, L, 3, H, D, dtype=dtype, device=device, seed=seed)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    return q, k, v


@pytest.mark.parametrize("D", [64, 72, 128])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", list(HEADS))
def test_cpu_pack_matches_ulysses_in(split, dtype, B, D):
    heads = HEADS[split]
    q, k, v = _fused_qkv(B, 13, sum(heads), D, dtype, seed=B * D)
    send = ulysses_pack_qkv(q, k, v, heads)
    assert send.shape == (3 * q.numel(),) and send.dtype == dtype and send.is_contiguous()
    assert torch.equal(send, _ulysses_in_send(q, k, v, heads))


def test_cpu_pack_contiguous_and_transposed_inputs():
    heads = [3, 2]
    q = randn(2, 9, 5, 8, seed=1)
    k = randn(2, 5, 9, 8, seed=2).transpose(1, 2)  # [B, L, H, D] with L, H strides swapped
    v = randn(9, 2, 5, 8, seed=3).transpose(0, 1)
    assert torch.equal(ulysses_pack_qkv(q, k, v, heads), _ulysses_in_send(q, k, v, heads))


@pytest.mark.parametrize("joint_front", [True, False], ids=["front", "back"])
@pytest.mark.parametrize("J", [0, 77])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", list(HEADS))
def test_cpu_unpack_matches_ulysses_out(split, dtype, J, joint_front):
    heads = HEADS[split]
    B, L, D = 3, 11, 72
    recv = randn(B * (J + L) * sum(heads) * D, dtype=dtype, seed=J + 7 * joint_front)
    out = ulysses_unpack_out(recv, heads, B, J, L, joint_front)
    assert out.shape == (B, J + L, sum(heads), D) and out.is_contiguous()
    assert torch.equal(out, _ulysses_out_place(recv, heads, B, J, L, joint_front))


def test_cpu_unpack_lse_layout():
    """``_lse_out`` reuses the output exchange with head_dim 1 and float32."""
    heads, B, J, L = [3, 3, 2], 2, 5, 7
    recv = randn(B * (J + L) * sum(heads), seed=3)
    out = ulysses_unpack_out(recv, heads, B, J, L, False)
    assert out.shape == (B, J + L, 8, 1)
    assert torch.equal(out, _ulysses_out_place(recv, heads, B, J, L, False))


@pytest.mark.parametrize("joint_kv", [True, False], ids=["joint_kv", "no_joint_kv"])
@pytest.mark.parametrize("J", [0, 77])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("U,h,head_start", [(2, 3, 3), (4, 7, 23)])
def test_cpu_place_matches_place_gathered(U, h, head_start, dtype, J, joint_kv):
    B, L, H, D = 3, 9, 30, 72
    recv, (q_j, k_j, v_j) = _place_case(U, B, L, h, H, D, J, dtype, seed=U + J)
    qbuf, kv = ulysses_place_gathered(recv, U, B, L, h, q_j, k_j, v_j, head_start, joint_kv)
    Jk = J if joint_kv else 0
    want_q, want_kv = _place_oracle(recv, U, B, L, h, q_j, k_j, v_j, head_start, J, Jk)
    assert qbuf.shape == (B, J + U * L, h, D) and kv.shape == (2, B, Jk + U * L, h, D)
    assert qbuf.is_contiguous() and kv.is_contiguous()
    assert torch.equal(qbuf, want_q) and torch.equal(kv, want_kv)


def _all_to_all(sends, in_splits):
    """What all_to_all_single delivers: rank r receives chunk r of every rank's send, in order."""
    chunks = [s.split(sp) for s, sp in zip(sends, in_splits, strict=True)]
    return [torch.cat([c[r] for c in chunks]) for r in range(len(sends))]


@pytest.mark.parametrize("joint_front", [True, False], ids=["front", "back"])
@pytest.mark.parametrize("split", list(HEADS))
def test_cpu_exchange_round_trip(split, joint_front):
    """Pack -> exchange -> each rank holds whole-sequence Q, K, V of its heads (and places them
    behind its joint heads); their output
    (joint rows first) -> exchange -> unpack gives every rank back its rows of all heads."""
    heads = HEADS[split]
    U, H, B, L, J, D = len(heads), sum(heads), 2, 5, 3, 8
    starts = [sum(heads[:i]) for i in range(U)]
    full = [randn(B, U * L, H, D, seed=s) for s in range(3)]  # q, k, v over the whole sequence
    joint = randn(B, J, H, D, seed=9)  # the joint rows' "attention output", all heads
    shards = [[t[:, r * L:(r + 1) * L] for t in full] for r in range(U)]
    sends = [ulysses_pack_qkv(*s, heads) for s in shards]
    recvs = _all_to_all(sends, [[3 * B * L * h * D for h in heads]] * U)
    out_sends = []
    for r, h in enumerate(heads):
        got = recvs[r].view(U, 3, B, L, h, D).permute(1, 2, 0, 3, 4, 5).reshape(3, B, U * L, h, D)
        for t in range(3):
            assert torch.equal(got[t], full[t][:, :, starts[r]:starts[r] + h])
        hs = slice(starts[r], starts[r] + h)
        qbuf, kv = ulysses_place_gathered(recvs[r], U, B, L, h, joint, joint * 2, joint * 3,
                                          starts[r], True)
        assert torch.equal(qbuf, torch.cat([joint[:, :, hs], full[0][:, :, hs]], dim=1))
        assert torch.equal(kv[0], torch.cat([2 * joint[:, :, hs], full[1][:, :, hs]], dim=1))
        assert torch.equal(kv[1], torch.cat([3 * joint[:, :, hs], full[2][:, :, hs]], dim=1))
        # This rank's output: joint rows then the gathered sequence, its heads only.
        o_h = torch.cat([joint[:, :, starts[r]:starts[r] + h], got[0]], dim=1)
        send = o_h.new_empty(U, B, J + L, h, D)
        send[:, :, :J] = o_h[:, :J].unsqueeze(0)
        send[:, :, J:] = o_h[:, J:].reshape(B, U, L, h, D).permute(1, 0, 2, 3, 4)
        out_sends.append(send.reshape(-1))
    back = _all_to_all(out_sends, [[B * (J + L) * h * D] * U for h in heads])
    for r in range(U):
        out = ulysses_unpack_out(back[r], heads, B, J, L, joint_front)
        mine = full[0][:, r * L:(r + 1) * L]
        want = torch.cat([joint, mine] if joint_front else [mine, joint], dim=1)
        assert torch.equal(out, want)


# Push variants: every rank of a simulated Ulysses group pushes into all ranks' buffers (plain
# tensors of this process standing in for the peers' symmetric memory); the oracle is the
# layout written from the whole-sequence tensors.

_SLACK = 5  # elements past what a push needs: must stay untouched


def _nan(n, dtype, device):
    return torch.full((n,), float("nan"), dtype=dtype, device=device)


def _untouched(x):
    return bool(torch.isnan(x).all())


def _check_push_in(heads, B, L, J, Jk, D, dtype, device):
    U, H = len(heads), sum(heads)
    starts = [sum(heads[:i]) for i in range(U)]
    full = _fused_qkv(B, U * L, H, D, dtype, device, seed=7 * D + J)  # strided q, k, v
    need = [B * (J + U * L) * h * D + 2 * B * (Jk + U * L) * h * D for h in heads]
    dst = [_nan(n + _SLACK, dtype, device) for n in need]
    for r in range(U):
        ulysses_push_qkv(*(t[:, r * L:(r + 1) * L] for t in full), heads, dst, r, J, Jk)
    for j, h in enumerate(heads):
        hs = slice(starts[j], starts[j] + h)
        nq = B * (J + U * L) * h * D
        qbuf = dst[j][:nq].view(B, J + U * L, h, D)
        kv = dst[j][nq:need[j]].view(2, B, Jk + U * L, h, D)
        assert torch.equal(qbuf[:, J:], full[0][:, :, hs])
        assert torch.equal(kv[0, :, Jk:], full[1][:, :, hs])
        assert torch.equal(kv[1, :, Jk:], full[2][:, :, hs])
        # the joint rows are the owner's; nothing past the buffers is written
        assert _untouched(qbuf[:, :J]) and _untouched(kv[:, :, :Jk])
        assert _untouched(dst[j][need[j]:])


def _push_out_case(heads, B, L, J, D, dtype, device, seed):
    """The whole output of a group (sequence rows and joint rows), NaN-filled destination
    buffers, and each rank's output ``o`` in attention's layout ([B, h, J + U*L, D] transposed,
    not contiguous)."""
    U, H = len(heads), sum(heads)
    starts = [sum(heads[:i]) for i in range(U)]
    out_full = randn(B, U * L, H, D, dtype=dtype, device=device, seed=seed)
    joint = randn(B, J, H, D, dtype=dtype, device=device, seed=seed + 1)
    n = B * (J + L) * H * D
    dst = [_nan(n + _SLACK, dtype, device) for _ in range(U)]
    outs = []
    for r, h in enumerate(heads):
        hs = slice(starts[r], starts[r] + h)
        o = torch.cat([joint[:, :, hs], out_full[:, :, hs]], dim=1).transpose(1, 2)
        outs.append(o.contiguous().transpose(1, 2))
    return U, H, starts, out_full, joint, n, dst, outs


def _check_push_out(heads, B, L, J, D, joint_front, dtype, device):
    U, H, _, out_full, joint, n, dst, outs = _push_out_case(heads, B, L, J, D, dtype, device,
                                                            D + J)
    for r, o in enumerate(outs):
        ulysses_push_out(o, heads, dst, r, L, joint_front)
    for u in range(U):
        mine = out_full[:, u * L:(u + 1) * L]
        want = torch.cat([joint, mine] if joint_front else [mine, joint], dim=1)
        assert torch.equal(dst[u][:n].view(B, J + L, H, D), want)
        assert _untouched(dst[u][n:])


def _check_push_out_blocks(heads, B, L, J, D, dtype, device):
    """Every rank pushes its block; each buffer must then be the output all-to-all's receive
    buffer (written here from the layout: rank j's heads of the joint rows and of this rank's
    rows, blocks in j order), and unpack to ulysses_push_out's result either way round."""
    U, H, starts, out_full, joint, n, dst, outs = _push_out_case(heads, B, L, J, D, dtype,
                                                                 device, D + J + 2)
    for r, o in enumerate(outs):
        ulysses_push_out_blocks(o, heads, dst, r, L)
    for u in range(U):
        mine = out_full[:, u * L:(u + 1) * L]
        blocks = [torch.cat([joint, mine], dim=1)[:, :, starts[j]:starts[j] + h].reshape(-1)
                  for j, h in enumerate(heads)]
        assert torch.equal(dst[u][:n], torch.cat(blocks))
        assert _untouched(dst[u][n:])
        for front in (True, False):
            want = torch.cat([joint, mine] if front else [mine, joint], dim=1)
            assert torch.equal(ulysses_unpack_out(dst[u][:n], heads, B, J, L, front), want)


@pytest.mark.parametrize("J,Jk", [(0, 0), (3, 3), (3, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", list(HEADS))
def test_cpu_push_qkv_places_every_rank(split, dtype, J, Jk):
    _check_push_in(HEADS[split], 2, 5, J, Jk, 8, dtype, "cpu")


@pytest.mark.parametrize("joint_front", [True, False], ids=["front", "back"])
@pytest.mark.parametrize("J", [0, 3])
@pytest.mark.parametrize("split", list(HEADS))
def test_cpu_push_out_returns_every_row(split, J, joint_front):
    _check_push_out(HEADS[split], 2, 5, J, 8, joint_front, torch.float32, "cpu")


@pytest.mark.parametrize("J", [0, 3])
@pytest.mark.parametrize("heads", [[2, 2, 2], [8, 8, 7, 7], [5, 0, 3]],
                         ids=["even", "uneven", "empty-rank"])
def test_cpu_push_out_blocks_fills_the_receive_buffer(heads, J):
    _check_push_out_blocks(heads, 2, 5, J, 8, torch.float32, "cpu")


def _push_bad_arguments(device):
    q = randn(2, 4, 6, 8, seed=1, device=device)
    heads = [3, 3]
    need = 2 * (1 + 8) * 3 * 8 + 2 * 2 * (1 + 8) * 3 * 8
    dst = [q.new_zeros(need), q.new_zeros(need)]
    ulysses_push_qkv(q, q, q, heads, dst, 1, 1, 1)  # fits exactly
    with pytest.raises(ValueError, match=r"ulysses_push_qkv: sum\(heads\) = 5 != H = 6"):
        ulysses_push_qkv(q, q, q, [3, 2], dst, 0, 1, 1)
    with pytest.raises(ValueError, match="ulysses_push_qkv: at most 1024 heads, got H = 1025"):
        big = randn(1, 1, 1025, 1, seed=3, device=device)
        ulysses_push_qkv(big, big, big, [1025], [big.new_zeros(3 * 1025)], 0, 0, 0)
    with pytest.raises(ValueError, match="ulysses_push_qkv: dst has 1 buffers for 2 ranks"):
        ulysses_push_qkv(q, q, q, heads, dst[:1], 0, 1, 1)
    with pytest.raises(ValueError, match=f"ulysses_push_qkv: dst\\[1\\] has {need - 1} "
                                         f"elements, the push needs {need}"):
        ulysses_push_qkv(q, q, q, heads, [dst[0], dst[1][1:]], 0, 1, 1)
    with pytest.raises(ValueError, match=r"ulysses_push_qkv: rank 2 is outside \[0, 2\)"):
        ulysses_push_qkv(q, q, q, heads, dst, 2, 1, 1)
    with pytest.raises(ValueError, match="ulysses_push_qkv: need J >= 0 and Jk in"):
        ulysses_push_qkv(q, q, q, heads, dst, 0, 2, 1)
    with pytest.raises(ValueError, match="ulysses_push_qkv: dst\\[0\\] must be a flat"):
        ulysses_push_qkv(q, q, q, heads, [dst[0].view(2, -1), dst[1]], 0, 1, 1)
    with pytest.raises(ValueError, match="ulysses_push_qkv: dst\\[1\\] is torch.float64"):
        ulysses_push_qkv(q, q, q, heads, [dst[0], dst[1].double()], 0, 1, 1)
    o = randn(2, 1 + 2 * 4, 3, 8, seed=2, device=device)
    out = [q.new_zeros(2 * 5 * 6 * 8) for _ in heads]
    ulysses_push_out(o, heads, out, 0, 4, True)
    with pytest.raises(ValueError, match="ulysses_push_out: o must be"):
        ulysses_push_out(o, [2, 4], out, 0, 4, True)
    with pytest.raises(ValueError, match="ulysses_push_out: o must be"):
        ulysses_push_out(o, heads, out, 0, 5, True)
    with pytest.raises(ValueError, match="ulysses_push_out: dst\\[0\\] has"):
        ulysses_push_out(o, heads, [out[0][:-1], out[1]], 1, 4, False)
    ulysses_push_out_blocks(o, heads, out, 0, 4)
    with pytest.raises(ValueError, match="ulysses_push_out_blocks: o must be"):
        ulysses_push_out_blocks(o, heads, out, 0, 5)
    with pytest.raises(ValueError, match=r"ulysses_push_out_blocks: rank 2 is outside \[0, 2\)"):
        ulysses_push_out_blocks(o, heads, out, 2, 4)
    with pytest.raises(ValueError, match="ulysses_push_out_blocks: dst\\[1\\] has"):
        ulysses_push_out_blocks(o, heads, [out[0], out[1][:-1]], 0, 4)


def _bad_arguments(device):
    q = randn(2, 4, 6, 8, seed=1, device=device)
    with pytest.raises(ValueError, match=r"ulysses_pack_qkv: sum\(heads\) = 5 != H = 6"):
        ulysses_pack_qkv(q, q, q, [3, 2])
    with pytest.raises(ValueError, match="ulysses_pack_qkv: q .* must have one shape"):
        ulysses_pack_qkv(q, q[:, :3], q, [3, 3])
    with pytest.raises(ValueError, match="ulysses_pack_qkv: head_dim of k must be contiguous"):
        ulysses_pack_qkv(q, randn(2, 4, 8, 6, seed=2, device=device).transpose(2, 3), q, [3, 3])
    with pytest.raises(TypeError, match="ulysses_pack_qkv: q, k, v dtypes differ"):
        ulysses_pack_qkv(q, q.double(), q, [3, 3])
    with pytest.raises(ValueError, match="ulysses_pack_qkv: heads .* negative"):
        ulysses_pack_qkv(q, q, q, [7, -1])
    with pytest.raises(ValueError, match=r"ulysses_pack_qkv: heads must list 1\.\.64 per-rank "
                                         "counts, got 65"):
        ulysses_pack_qkv(q, q, q, [0] * 59 + [1] * 6)
    with pytest.raises(ValueError, match="ulysses_pack_qkv: q must be"):
        ulysses_pack_qkv(q[0], q[0], q[0], [6])
    recv = randn(2 * 5 * 6 * 8, seed=3, device=device)
    with pytest.raises(ValueError, match="ulysses_unpack_out: recv has 480 elements, not a "
                                         "multiple of B \\* \\(J \\+ L\\) \\* H = 2 \\* 6 \\* 6"):
        ulysses_unpack_out(recv, [3, 3], 2, 1, 5, True)
    with pytest.raises(ValueError, match="ulysses_unpack_out: recv must be a flat contiguous"):
        ulysses_unpack_out(recv.view(2, -1), [3, 3], 2, 0, 5, True)
    with pytest.raises(ValueError, match="ulysses_unpack_out: recv must be a flat contiguous"):
        ulysses_unpack_out(recv[::2], [3, 3], 2, 0, 2, True)
    with pytest.raises(ValueError, match="ulysses_unpack_out: B, J, L must be >= 0"):
        ulysses_unpack_out(recv, [3, 3], 2, -1, 5, True)
    with pytest.raises(ValueError, match="ulysses_place_gathered: recv has 480 elements, not a "
                                         "multiple of U \\* 3 \\* B \\* L \\* h = 144"):
        ulysses_place_gathered(recv, 2, 2, 3, 4, None, None, None, 0, False)
    recv, joint = _place_case(2, 1, 4, 3, 6, 8, 5, device=device, seed=4)
    with pytest.raises(ValueError, match="ulysses_place_gathered: pass all of q_j, k_j, v_j"):
        ulysses_place_gathered(recv, 2, 1, 4, 3, joint[0], None, joint[2], 0, True)
    with pytest.raises(ValueError, match=r"ulysses_place_gathered: heads \[4, 7\) are outside"):
        ulysses_place_gathered(recv, 2, 1, 4, 3, *joint, 4, True)
    with pytest.raises(ValueError, match="ulysses_place_gathered: q_j must be"):
        ulysses_place_gathered(recv, 2, 1, 4, 3, *(t[..., :4] for t in joint), 0, True)
    with pytest.raises(ValueError, match="ulysses_place_gathered: joint tensor 2 is"):
        ulysses_place_gathered(recv, 2, 1, 4, 3, joint[0], joint[1], joint[2].double(), 0, True)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_push_bad_arguments(device):
    """CPU: the references' checks; meta: the public functions' checks ahead of a non-CPU
    kernel and the fakes' (what torch.compile traces) behind them. Whether CUDA raises instead
    of reaching the native launchers' checks is test_gpu_bad_arguments_raise."""
    _push_bad_arguments(device)


@pytest.mark.parametrize("op", ["push", "push_out", "push_out_blocks"])
def test_push_kernel_switch(monkeypatch, op):
    """XDIT_OPS_PUSH_KERNEL: v1, v2, v3 or unset pass; another value raises, named after the
    op, from the public function's checks ahead of a non-CPU kernel (meta here, CUDA alike)."""
    q = torch.empty(1, 4, 2, 8, device="meta")
    heads = [1, 1]

    def call():
        if op == "push":
            dst = [torch.empty(1 * (2 * 4) * 1 * 8 * 3, device="meta") for _ in heads]
            ulysses_push_qkv(q, q, q, heads, dst, 0, 0, 0)
        else:
            o = torch.empty(1, 2 * 2, 1, 8, device="meta")
            out = [torch.empty(1 * 2 * 2 * 8, device="meta") for _ in heads]
            if op == "push_out":
                ulysses_push_out(o, heads, out, 0, 2, True)
            else:
                ulysses_push_out_blocks(o, heads, out, 0, 2)

    for value in ("v1", "v2", "v3", ""):
        monkeypatch.setenv("XDIT_OPS_PUSH_KERNEL", value)
        call()
    monkeypatch.setenv("XDIT_OPS_PUSH_KERNEL", "v4")
    name = {"push": "ulysses_push_qkv"}.get(op, f"ulysses_{op}")
    with pytest.raises(ValueError, match=f"{name}: XDIT_OPS_PUSH_KERNEL must be one of "
                                         r"\('v1', 'v2', 'v3'\), got 'v4'"):
        call()


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_arguments(device):
    _bad_arguments(device)


def test_opcheck():
    q, k, v = _fused_qkv(2, 5, 7, 8, seed=4)
    torch.library.opcheck(torch.ops.xdit_ops.ulysses_pack_qkv.default, (q, k, v, [2, 2, 2, 1]))
    recv = randn(2 * (3 + 5) * 7 * 8, seed=5)
    torch.library.opcheck(torch.ops.xdit_ops.ulysses_unpack_out.default,
                          (recv, [2, 2, 2, 1], 2, 3, 5, False))
    recv, joint = _place_case(3, 2, 4, 2, 7, 8, 5, seed=6)
    torch.library.opcheck(torch.ops.xdit_ops.ulysses_place_gathered.default,
                          (recv, 3, 2, 4, 2, *joint, 5, False))
    heads = [2, 2, 2, 1]
    dst = [torch.zeros(2 * (3 + 4 * 5) * h * 8 * 3) for h in heads]
    torch.library.opcheck(torch.ops.xdit_ops.ulysses_push_qkv.default,
                          (q, k, v, heads, dst, 1, 3, 3))
    o = randn(2, 3 + 4 * 5, 2, 8, seed=7)
    out = [torch.zeros(2 * (3 + 5) * 7 * 8) for _ in heads]
    torch.library.opcheck(torch.ops.xdit_ops.ulysses_push_out.default,
                          (o, heads, out, 2, 5, False))
    torch.library.opcheck(torch.ops.xdit_ops.ulysses_push_out_blocks.default,
                          (o, heads, out, 2, 5))


def test_compile_fullgraph_matches_eager():
    heads = [3, 2]

    def f(qkv):
        q, k, v = qkv.unbind(2)
        send = ulysses_pack_qkv(q, k, v, heads)
        return ulysses_unpack_out(send, heads, qkv.shape[0], 0, 3 * qkv.shape[1], False)

    qkv = randn(2, 6, 3, 5, 8, seed=6)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(qkv), f(qkv))


# ------------------------------------------------------------------------------------- GPU


def _poisoned_alloc(n: int, dtype: torch.dtype) -> None:
    """Leave a NaN-filled block in the caching allocator so an unwritten output would show."""
    torch.full((n,), float("nan"), dtype=dtype, device="cuda")


def _native():
    import xdit_ops._extension as ext

    assert ext.has("_C"), ext.reason("_C")


@pytest.mark.gpu
def test_gpu_bad_arguments_raise():
    """Bad arguments on CUDA raise the CPU reference's exceptions, from the Python checks ahead
    of the native launchers (whose failing TORCH_CHECKs crashed the process on the GPU machine
    in run 31), instead of killing the process."""
    _native()
    _bad_arguments("cuda")
    _push_bad_arguments("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 72, 36, 128, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", [[6, 6, 6, 6], [8, 8, 7, 7]], ids=["even", "uneven"])
def test_gpu_pack_equals_cpu(heads, dtype, D):
    _native()
    B, L = 3, 1031
    q, k, v = _fused_qkv(B, L, sum(heads), D, dtype, device="cuda", seed=D)
    _poisoned_alloc(3 * q.numel(), dtype)
    got = ulysses_pack_qkv(q, k, v, heads)
    assert torch.equal(got.cpu(), ulysses_pack_qkv(q.cpu(), k.cpu(), v.cpu(), heads))
    assert torch.equal(got, _ulysses_in_send(q, k, v, heads))


@pytest.mark.gpu
def test_gpu_pack_unaligned_and_mixed_strides():
    """A base pointer off 16-byte alignment (storage offset) forces a narrower copy unit; q, k
    and v with three different stride patterns share one launch."""
    _native()
    heads, B, L, D = [5, 5, 4], 2, 33, 64
    H = sum(heads)
    base = randn(B * L * H * D + 8, dtype=torch.bfloat16, device="cuda", seed=1)
    q = base[1:1 + B * L * H * D].view(B, L, H, D)  # 2-byte aligned only
    k = randn(B, H, L, D, dtype=torch.bfloat16, device="cuda", seed=2).transpose(1, 2)
    v = randn(B, L, 3, H, D, dtype=torch.bfloat16, device="cuda", seed=3)[:, :, 1]
    want = ulysses_pack_qkv(q.cpu(), k.cpu(), v.cpu(), heads)
    assert torch.equal(ulysses_pack_qkv(q, k, v, heads).cpu(), want)
    q = base[8:].view(B, L, H, D)  # 16-byte aligned again
    assert torch.equal(ulysses_pack_qkv(q, k, v, heads).cpu(),
                       ulysses_pack_qkv(q.cpu(), k.cpu(), v.cpu(), heads))


@pytest.mark.gpu
@pytest.mark.parametrize("joint_front", [True, False], ids=["front", "back"])
@pytest.mark.parametrize("J", [0, 77])
@pytest.mark.parametrize("D", [128, 72, 36, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [[6, 6, 6, 6], [8, 8, 7, 7]], ids=["even", "uneven"])
def test_gpu_unpack_equals_cpu(heads, dtype, D, J, joint_front):
    _native()
    B, L = 2, 1031
    recv = randn(B * (J + L) * sum(heads) * D, dtype=dtype, device="cuda", seed=D + J)
    _poisoned_alloc(recv.numel(), dtype)
    got = ulysses_unpack_out(recv, heads, B, J, L, joint_front)
    assert torch.equal(got.cpu(), ulysses_unpack_out(recv.cpu(), heads, B, J, L, joint_front))
    assert torch.equal(got, _ulysses_out_place(recv, heads, B, J, L, joint_front))


@pytest.mark.gpu
def test_gpu_unpack_unaligned_recv():
    _native()
    heads, B, J, L, D = [3, 2], 2, 5, 40, 64
    n = B * (J + L) * 5 * D
    recv = randn(n + 3, dtype=torch.float16, device="cuda", seed=4)[3:]
    want = ulysses_unpack_out(recv.cpu(), heads, B, J, L, False)
    assert torch.equal(ulysses_unpack_out(recv, heads, B, J, L, False).cpu(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("joint_kv", [True, False], ids=["joint_kv", "no_joint_kv"])
@pytest.mark.parametrize("J", [0, 77])
@pytest.mark.parametrize("D", [128, 72, 36])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_place_equals_cpu(dtype, D, J, joint_kv):
    _native()
    U, B, L, h, H, head_start = 4, 2, 1031, 7, 30, 16
    recv, joint = _place_case(U, B, L, h, H, D, J, dtype, device="cuda", seed=D + J)
    _poisoned_alloc(recv.numel(), dtype)
    qbuf, kv = ulysses_place_gathered(recv, U, B, L, h, *joint, head_start, joint_kv)
    want_q, want_kv = ulysses_place_gathered(
        recv.cpu(), U, B, L, h, *(None if t is None else t.cpu() for t in joint), head_start,
        joint_kv)
    assert torch.equal(qbuf.cpu(), want_q) and torch.equal(kv.cpu(), want_kv)


@pytest.mark.gpu
def test_gpu_place_unaligned_joint():
    """Joint rows at a 2-byte-aligned address force a narrower copy unit for the whole launch."""
    _native()
    U, B, L, h, H, D, J = 2, 1, 300, 12, 24, 128, 77
    recv = randn(U * 3 * B * L * h * D, dtype=torch.bfloat16, device="cuda", seed=11)
    base = randn(B * J * 3 * H * D + 1, dtype=torch.bfloat16, device="cuda", seed=12)
    joint = base[1:].view(B, J, 3, H, D).unbind(2)
    qbuf, kv = ulysses_place_gathered(recv, U, B, L, h, *joint, 12, True)
    want_q, want_kv = ulysses_place_gathered(recv.cpu(), U, B, L, h, *(t.cpu() for t in joint),
                                             12, True)
    assert torch.equal(qbuf.cpu(), want_q) and torch.equal(kv.cpu(), want_kv)


@pytest.mark.gpu
def test_gpu_empty_inputs():
    _native()
    q = torch.empty(2, 0, 4, 64, device="cuda", dtype=torch.bfloat16)
    assert ulysses_pack_qkv(q, q, q, [2, 2]).numel() == 0
    recv = torch.empty(0, device="cuda")
    assert ulysses_unpack_out(recv, [2, 2], 2, 3, 5, True).shape == (2, 8, 4, 0)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    _native()
    heads, B, L, J, D = [8, 8, 7, 7], 2, 257, 77, 128
    q, k, v = _fused_qkv(B, L, sum(heads), D, torch.bfloat16, device="cuda", seed=7)
    recv = randn(B * (J + L) * sum(heads) * D, dtype=torch.bfloat16, device="cuda", seed=8)
    U, h = len(heads), heads[2]
    recv_in = randn(U * 3 * B * L * h * D, dtype=torch.bfloat16, device="cuda", seed=11)
    qkv_j = (q[:, :J], k[:, :J], v[:, :J])  # any [B, J, H, D] views serve as joint rows

    def calls():
        return (ulysses_pack_qkv(q, k, v, heads), ulysses_unpack_out(recv, heads, B, J, L, False),
                *ulysses_place_gathered(recv_in, U, B, L, h, *qkv_j, 16, True))

    g, (send, out, qbuf, kv) = capture_cuda_graph(calls)
    # New inputs in the captured buffers, then replay: the graph reads them.
    q.copy_(randn(*q.shape, dtype=q.dtype, device="cuda", seed=9))
    recv.copy_(randn(recv.numel(), dtype=recv.dtype, device="cuda", seed=10))
    recv_in.copy_(randn(recv_in.numel(), dtype=recv.dtype, device="cuda", seed=12))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(send.cpu(), ulysses_pack_qkv(q.cpu(), k.cpu(), v.cpu(), heads))
    assert torch.equal(out.cpu(), ulysses_unpack_out(recv.cpu(), heads, B, J, L, False))
    want_q, want_kv = ulysses_place_gathered(recv_in.cpu(), U, B, L, h,
                                             *(t.cpu() for t in qkv_j), 16, True)
    assert torch.equal(qbuf.cpu(), want_q) and torch.equal(kv.cpu(), want_kv)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["v1", "v2"])
@pytest.mark.parametrize("J,Jk", [(0, 0), (77, 77), (77, 0)])
@pytest.mark.parametrize("D", [128, 72, 36, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [[6, 6, 6, 6], [8, 8, 7, 7]], ids=["even", "uneven"])
def test_gpu_push_qkv_places_every_rank(monkeypatch, heads, dtype, D, J, Jk, kernel):
    """The push kernel (both versions, XDIT_OPS_PUSH_KERNEL; v3 runs v2's, see
    test_gpu_push_shapes_of_usp) with every destination a buffer of this GPU (the kernel only
    sees pointers: peer-mapped memory is the same to it)."""
    _native()
    monkeypatch.setenv("XDIT_OPS_PUSH_KERNEL", kernel)
    _check_push_in(heads, 3, 1031, J, Jk, D, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["v1", "v2"])
@pytest.mark.parametrize("joint_front", [True, False], ids=["front", "back"])
@pytest.mark.parametrize("J", [0, 77])
@pytest.mark.parametrize("D", [128, 72, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [[6, 6, 6, 6], [8, 8, 7, 7]], ids=["even", "uneven"])
def test_gpu_push_out_returns_every_row(monkeypatch, heads, dtype, D, J, joint_front, kernel):
    _native()
    monkeypatch.setenv("XDIT_OPS_PUSH_KERNEL", kernel)
    _check_push_out(heads, 2, 1031, J, D, joint_front, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["v1", "v2"])
@pytest.mark.parametrize("J", [0, 77])
@pytest.mark.parametrize("D", [128, 72, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [[6, 6, 6, 6], [8, 8, 7, 7]], ids=["even", "uneven"])
def test_gpu_push_out_blocks_fills_the_receive_buffer(monkeypatch, heads, dtype, D, J, kernel):
    """The rank-block output push (what usp_attention runs under XDIT_OPS_PUSH_KERNEL=v3, whose
    kernel is v2's) on either kernel, over push-out's matrix, then the native unpack of what it
    left."""
    _native()
    monkeypatch.setenv("XDIT_OPS_PUSH_KERNEL", kernel)
    _check_push_out_blocks(heads, 2, 1031, J, D, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["v1", "v2", "v3"])
def test_gpu_push_shapes_of_usp(monkeypatch, kernel):
    """The pushes at a 4-rank Flux shard's size (1152 rows of 24 heads of 128, bf16: many tiles
    per segment), a rank with no heads, and a contiguous source 2 bytes off 16-byte alignment
    (narrower vectors)."""
    _native()
    monkeypatch.setenv("XDIT_OPS_PUSH_KERNEL", kernel)
    _check_push_in([6, 6, 6, 6], 1, 1152, 0, 0, 128, torch.bfloat16, "cuda")
    _check_push_out([6, 6, 6, 6], 1, 1152, 0, 128, True, torch.bfloat16, "cuda")
    _check_push_out_blocks([6, 6, 6, 6], 1, 1152, 0, 128, torch.bfloat16, "cuda")
    _check_push_in([5, 0, 3], 2, 333, 7, 7, 64, torch.bfloat16, "cuda")
    _check_push_out([5, 0, 3], 2, 333, 7, 64, False, torch.bfloat16, "cuda")
    _check_push_out_blocks([5, 0, 3], 2, 333, 7, 64, torch.bfloat16, "cuda")
    # unaligned: q, k, v one element into a buffer (the copy width drops to 2 bytes)
    heads, B, L, H, D = [4, 4], 1, 257, 8, 128
    base = randn(3 * B * 2 * L * H * D + 1, dtype=torch.bfloat16, device="cuda", seed=3)
    q, k, v = base[1:].view(3, B, 2 * L, H, D).unbind(0)
    need = [B * (2 * L) * h * D * 3 for h in heads]
    dst = [_nan(n + _SLACK, torch.bfloat16, "cuda") for n in need]
    for r in range(2):
        ulysses_push_qkv(*(t[:, r * L:(r + 1) * L] for t in (q, k, v)), heads, dst, r, 0, 0)
    for j, h in enumerate(heads):
        nq = B * 2 * L * h * D
        hs = slice(4 * j, 4 * j + h)
        assert torch.equal(dst[j][:nq].view(B, 2 * L, h, D), q[:, :, hs])
        kv = dst[j][nq:need[j]].view(2, B, 2 * L, h, D)
        assert torch.equal(kv[0], k[:, :, hs]) and torch.equal(kv[1], v[:, :, hs])
        assert _untouched(dst[j][need[j]:])


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["v1", "v2", "v3"])
def test_gpu_push_cuda_graph(monkeypatch, kernel):
    """The three pushes captured in a CUDA graph replay with new inputs."""
    _native()
    monkeypatch.setenv("XDIT_OPS_PUSH_KERNEL", kernel)
    heads, B, L, J, D = [8, 8, 7, 7], 1, 300, 5, 128
    U, H = len(heads), sum(heads)
    q, k, v = _fused_qkv(B, L, H, D, torch.bfloat16, device="cuda", seed=21)
    need = [B * (J + U * L) * h * D * 3 for h in heads]
    dst = [torch.zeros(n, dtype=torch.bfloat16, device="cuda") for n in need]
    o = randn(B, J + U * L, heads[1], D, dtype=torch.bfloat16, device="cuda", seed=22)
    out = [torch.zeros(B * (J + L) * H * D, dtype=torch.bfloat16, device="cuda") for _ in heads]
    blocks = [torch.zeros_like(x) for x in out]

    def calls():
        ulysses_push_qkv(q, k, v, heads, dst, 1, J, J)
        ulysses_push_out(o, heads, out, 1, L, True)
        ulysses_push_out_blocks(o, heads, blocks, 1, L)

    g, _ = capture_cuda_graph(calls)
    q.copy_(randn(*q.shape, dtype=q.dtype, device="cuda", seed=23))
    o.copy_(randn(*o.shape, dtype=o.dtype, device="cuda", seed=24))
    g.replay()
    torch.cuda.synchronize()
    want = [torch.zeros(n, dtype=torch.bfloat16) for n in need]
    want_out = [torch.zeros(x.numel(), dtype=torch.bfloat16) for x in out]
    ulysses_push_qkv(q.cpu(), k.cpu(), v.cpu(), heads, want, 1, J, J)
    ulysses_push_out(o.cpu(), heads, want_out, 1, L, True)
    want_blocks = [torch.zeros(x.numel(), dtype=torch.bfloat16) for x in out]
    ulysses_push_out_blocks(o.cpu(), heads, want_blocks, 1, L)
    assert all(torch.equal(d.cpu(), w) for d, w in zip(dst, want, strict=True))
    assert all(torch.equal(x.cpu(), w) for x, w in zip(out, want_out, strict=True))
    assert all(torch.equal(x.cpu(), w) for x, w in zip(blocks, want_blocks, strict=True))


# Head chunks (usp_attention's overlap path): the push of chunk c of every share
# (src_head_start) and the push-out of one chunk's heads (head_offset).


def _check_push_chunks(U, h, C, B, L, J, Jk, D, dtype, device):
    H, hc = U * h, h // C
    full = _fused_qkv(B, U * L, H, D, dtype, device, seed=3 * D + J + C)
    need = B * (J + U * L) * hc * D + 2 * B * (Jk + U * L) * hc * D
    for c in range(C):
        dst = [_nan(need + _SLACK, dtype, device) for _ in range(U)]
        starts = [j * h + c * hc for j in range(U)]
        for r in range(U):
            ulysses_push_qkv(*(t[:, r * L:(r + 1) * L] for t in full), [hc] * U, dst, r, J, Jk,
                             src_head_start=starts)
        for j in range(U):
            hs = slice(starts[j], starts[j] + hc)
            nq = B * (J + U * L) * hc * D
            qbuf = dst[j][:nq].view(B, J + U * L, hc, D)
            kv = dst[j][nq:need].view(2, B, Jk + U * L, hc, D)
            assert torch.equal(qbuf[:, J:], full[0][:, :, hs]), (c, j)
            assert torch.equal(kv[0, :, Jk:], full[1][:, :, hs]), (c, j)
            assert torch.equal(kv[1, :, Jk:], full[2][:, :, hs]), (c, j)
            assert _untouched(qbuf[:, :J]) and _untouched(kv[:, :, :Jk])
            assert _untouched(dst[j][need:])


def _check_push_out_chunks(U, h, C, B, L, J, D, joint_front, dtype, device):
    H, hc = U * h, h // C
    out_full = randn(B, U * L, H, D, dtype=dtype, device=device, seed=D + J + C)
    joint = randn(B, J, H, D, dtype=dtype, device=device, seed=D + J + C + 1)
    n = B * (J + L) * H * D
    for c in range(C):
        dst = [_nan(n + _SLACK, dtype, device) for _ in range(U)]
        for r in range(U):
            h0 = r * h + c * hc
            hs = slice(h0, h0 + hc)
            o = torch.cat([joint[:, :, hs], out_full[:, :, hs]], dim=1)
            # per-rank counts with this rank's entry hc and the total H (as usp passes them)
            cnt = [h] * U
            cnt[r] = hc
            cnt[(r + 1) % U] += h - hc
            ulysses_push_out(o, cnt, dst, r, L, joint_front, head_offset=h0)
        for u in range(U):
            out = dst[u][:n].view(B, J + L, H, D)
            mine = out_full[:, u * L:(u + 1) * L]
            want = torch.cat([joint, mine] if joint_front else [mine, joint], dim=1)
            chunk = torch.zeros(H, dtype=torch.bool)
            for r in range(U):
                chunk[r * h + c * hc:r * h + (c + 1) * hc] = True
            assert torch.equal(out[:, :, chunk.to(out.device)], want[:, :, chunk.to(out.device)])
            assert _untouched(out[:, :, ~chunk.to(out.device)]) and _untouched(dst[u][n:])


@pytest.mark.parametrize("J,Jk", [(0, 0), (3, 3), (3, 0)])
@pytest.mark.parametrize("U,h,C", [(2, 4, 2), (3, 6, 3), (4, 2, 2)])
def test_cpu_push_head_chunks(U, h, C, J, Jk):
    _check_push_chunks(U, h, C, 2, 5, J, Jk, 8, torch.float32, "cpu")


@pytest.mark.parametrize("joint_front", [True, False], ids=["front", "back"])
@pytest.mark.parametrize("J", [0, 3])
@pytest.mark.parametrize("U,h,C", [(2, 4, 2), (3, 6, 3)])
def test_cpu_push_out_head_offset(U, h, C, J, joint_front):
    _check_push_out_chunks(U, h, C, 2, 5, J, 8, joint_front, torch.float32, "cpu")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_push_chunk_bad_arguments(device):
    if device == "cuda":
        _native()
    q = randn(1, 4, 6, 8, seed=1, device=device)
    need = (4 * 2) * 1 * 8 + 2 * (4 * 2) * 1 * 8
    dst = [q.new_zeros(need), q.new_zeros(need)]
    ulysses_push_qkv(q, q, q, [1, 1], dst, 0, 0, 0, src_head_start=[0, 5])  # fits exactly
    with pytest.raises(ValueError, match=r"ulysses_push_qkv: src_head_start=\[0, 6\] must give "
                                         "each of the 2 destinations a source range"):
        ulysses_push_qkv(q, q, q, [1, 1], dst, 0, 0, 0, src_head_start=[0, 6])
    with pytest.raises(ValueError, match=r"ulysses_push_qkv: src_head_start=\[0\] must give"):
        ulysses_push_qkv(q, q, q, [1, 1], dst, 0, 0, 0, src_head_start=[0])
    o = randn(1, 8, 1, 8, seed=2, device=device)
    out = [q.new_zeros(4 * 6 * 8), q.new_zeros(4 * 6 * 8)]
    ulysses_push_out(o, [1, 5], out, 0, 4, True, head_offset=5)
    with pytest.raises(ValueError, match="ulysses_push_out: head_offset=6 puts o's 1 heads "
                                         "outside the 6 heads of an output row"):
        ulysses_push_out(o, [1, 5], out, 0, 4, True, head_offset=6)


@pytest.mark.gpu
def test_gpu_push_chunks_need_v2(monkeypatch):
    _native()
    monkeypatch.setenv("XDIT_OPS_PUSH_KERNEL", "v1")
    q = randn(1, 4, 6, 8, seed=1, device="cuda")
    need = (4 * 2) * 1 * 8 + 2 * (4 * 2) * 1 * 8
    with pytest.raises(ValueError, match="ulysses_push_qkv: src_head_start needs the v2 kernel"):
        ulysses_push_qkv(q, q, q, [1, 1], [q.new_zeros(need)] * 2, 0, 0, 0,
                         src_head_start=[0, 3])


@pytest.mark.gpu
@pytest.mark.parametrize("J,Jk", [(0, 0), (77, 77), (77, 0)])
@pytest.mark.parametrize("D", [128, 72])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("U,h,C", [(4, 6, 2), (4, 6, 3), (2, 5, 5)])
def test_gpu_push_head_chunks(U, h, C, dtype, D, J, Jk):
    """The v2 push kernel with src_head_start, every destination a buffer of this GPU."""
    _native()
    _check_push_chunks(U, h, C, 3, 1031, J, Jk, D, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["v1", "v2"])
@pytest.mark.parametrize("joint_front", [True, False], ids=["front", "back"])
@pytest.mark.parametrize("J", [0, 77])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("U,h,C", [(4, 6, 2), (2, 5, 5)])
def test_gpu_push_out_head_offset(monkeypatch, U, h, C, dtype, J, joint_front, kernel):
    _native()
    monkeypatch.setenv("XDIT_OPS_PUSH_KERNEL", kernel)
    _check_push_out_chunks(U, h, C, 2, 1031, J, 128, joint_front, dtype, "cuda")
