"""Reference attention with its log-sum-exp, and the merge of partial attentions."""

from __future__ import annotations

import math

import torch


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention computed in fp32 (fp64 for fp64 inputs).

    Parameters
    ----------
    q : [B, Sq, H, D]
    k, v : [B, Sk, H, D] and [B, Sk, H, Dv]
    scale : softmax scale, default 1/sqrt(D)
    key_mask : optional bool [B, Sk]; False keys are excluded.
    compute_dtype : override the accumulation dtype (default fp32, or fp64 for fp64 inputs).

    Returns
    -------
    out : [B, Sq, H, Dv] in q's dtype
    lse : [B, H, Sq] fp32 (fp64 for fp64 compute), natural log; -inf for rows with no key.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    qf = q.to(compute_dtype).transpose(1, 2)  # [B, H, Sq, D]
    kf = k.to(compute_dtype).transpose(1, 2)
    vf = v.to(compute_dtype).transpose(1, 2)
    mask = None if key_mask is None else key_mask[:, None, None, :].to(torch.bool)
    B, H, Sq, Sk = qf.shape[0], qf.shape[1], qf.shape[2], kf.shape[2]
    # Query chunks keep the [B, H, chunk, Sk] score matrix under ~1 GB, so the reference also
    # serves as the error oracle at real DiT sizes on a GPU.
    chunk = max(1, min(Sq, (1 << 28) // max(1, B * H * Sk)))
    outs, lses = [], []
    for i in range(0, max(Sq, 1), chunk):
        s = torch.matmul(qf[:, :, i : i + chunk], kf.transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # [B, H, chunk]
        finite = torch.isfinite(lse)
        p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse))[..., None])
        p = torch.where(finite[..., None], p, torch.zeros_like(p))
        outs.append(torch.matmul(p, vf))
        lses.append(lse)
    out = torch.cat(outs, dim=2) if Sq else qf.new_zeros(B, H, 0, vf.shape[-1])
    lse = torch.cat(lses, dim=2) if Sq else qf.new_zeros(B, H, 0)
    out = out.transpose(1, 2).to(q.dtype).contiguous()
    lse_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    return out, lse.to(lse_dtype).contiguous()


def merge_attention_states_ref(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """Merge ``block_out`` (normalised by ``exp(block_lse)``) into ``out``/``lse`` in place.

    out : [B, S, H, D] fp32 accumulator; lse : [B, H, S] fp32.
    block_out : [B, S, H, D] any float dtype; block_lse : [B, H, S] fp32.
    Rows where ``block_lse`` is -inf are left unchanged.
    """
    # Rows where the block saw no key (block_lse = -inf) are left as they are; its output there
    # may be NaN (a softmax over no keys), so it must not enter the arithmetic.
    skip = block_lse == float("-inf")
    m = torch.maximum(lse, block_lse)
    m_safe = torch.where(skip, torch.zeros_like(m), m)
    ea = torch.where(skip, torch.ones_like(m), torch.exp(lse - m_safe))
    eb = torch.where(skip, torch.zeros_like(m), torch.exp(block_lse - m_safe))
    denom = ea + eb
    wa = (ea / denom).transpose(1, 2).unsqueeze(-1)  # [B, H, S] -> [B, S, H, 1]
    wb = (eb / denom).transpose(1, 2).unsqueeze(-1)
    blk = torch.where(skip.transpose(1, 2).unsqueeze(-1), 0.0, block_out.to(out.dtype))
    # An empty accumulator (wa == 0) may hold NaN: select, do not multiply by zero.
    out.copy_(torch.where(wa == 0, 0.0, wa * out) + wb * blk)
    lse.copy_(torch.where(skip, lse, m_safe + torch.log(denom)))
