"""Loss and exact LoRA gradients for one batch: forward, fused softmax-cross-entropy, backward.

Loss = inv_norm · Σ_i w_i · nll_i over the B·T positions (w = per-token weight/mask).
With gradient checkpointing only each block's input [N, C] is kept; backward recomputes the
block's forward (keeping its cache, skipping its output) right before running its backward.  The
last block keeps its cache from the first pass: its backward follows the head directly.
Gradients accumulate (+=) into ``grads`` (same layout as the LoRA parameters), so gradient
accumulation over several batches is simply several calls.
"""

from __future__ import annotations

import numpy as np

from ..arch import (
    ATTN_K,
    ATTN_K_NORM,
    ATTN_NORM,
    ATTN_OUT,
    ATTN_POST_NORM,
    ATTN_Q,
    ATTN_Q_NORM,
    ATTN_QKV,
    ATTN_V,
    FFN_DOWN,
    FFN_GATE,
    FFN_NORM,
    FFN_POST_NORM,
    FFN_UP,
    OUTPUT,
    OUTPUT_NORM,
    TOKEN_EMBD,
    weight,
)
from ..lora import LoraParams
from ..model import HParams
from . import kernels as K
from .forward import (
    LayerCache,
    Positions,
    _lora,
    compact_rows,
    embed_forward,
    embed_scale,
    forward_hidden,
    head_logits,
    head_rows,
    layer_forward,
    logits_bytes,
    norm_weight,
)


def linear_backward(dy: np.ndarray, x: np.ndarray, W: np.ndarray, lora, u, grads: LoraParams | None,
                    name: str, need_dx: bool = True) -> np.ndarray | None:
    """Backward of y = x·Wᵀ (+ bias) + s·(x·a)·bᵀ: dy [N, n_out] -> dx [N, n_in] (None when not
    ``need_dx``: then only the adapter's gradients); da, db accumulate.  (The bias is frozen: it
    has no gradient.)"""
    dx = dy @ W if need_dx else None  # [N, n_in]
    if lora is None:
        return dx
    a, b, s = lora
    K.lora_backward(dy, x, u, a, b, s, dx, grads.a[name], grads.b[name])  # dx += s·(dy·b)·aᵀ; da, db
    return dx


def norm_backward(dg: np.ndarray, lora, grads: LoraParams | None, name: str) -> None:
    """Chain the norm-weight gradient dg [C] into its adapter: g' = g + s·a·b[0]."""
    if lora is None:
        return
    a, b, s = lora
    grads.a[name] += s * np.outer(dg, b[0])  # [C, r]
    grads.b[name][0] += s * (a.T @ dg)  # [r]


def _gated_act_backward(hp: HParams, dhf: np.ndarray, g: np.ndarray, u: np.ndarray):
    return K.geglu_backward(dhf, g, u) if hp.spec.act == "gelu_tanh" else K.swiglu_backward(dhf, g, u)


def layer_backward(dout: np.ndarray, c: LayerCache, lw, il: int, hp: HParams, ps: Positions,
                   lora: LoraParams | None, grads: LoraParams | None, flash: bool,
                   need_dx: bool = True) -> np.ndarray | None:
    """Backward of one block: dout [N, C] -> dx [N, C]; LoRA gradients accumulate in ``grads``.
    Without ``need_dx`` (the first block, when nothing below it is trained) dx is not computed
    unless the attention norm's adapter needs it, and None is returned."""
    spec = hp.spec
    Hq, Hkv, D = hp.n_head, hp.n_head_kv, hp.head_dim
    B, T = ps.B, ps.T
    N = B * T

    def lin(dy, x, base, need=True):
        name = weight(base, il)
        return linear_backward(dy, x, lw[base], _lora(lora, name), c.us[base], grads, name, need)

    # feed-forward: out = x2 + [post_ffw_norm](down(act(gate(h2)) · up(h2)))
    dd = dout
    if spec.post_norms:
        dd, _ = K.rmsnorm_backward(dout, c.d, lw[FFN_POST_NORM], c.rstd_d, False)  # the norm weight is frozen
    dhf = lin(dd, c.hf, FFN_DOWN)  # [N, F]
    dg, du = _gated_act_backward(hp, dhf, c.g, c.u)  # [N, F] each
    if spec.fused_up:
        dh2 = lin(np.concatenate([dg, du], axis=1), c.h2, FFN_UP)  # [N, C]
    else:
        dh2 = lin(dg, c.h2, FFN_GATE)
        dh2 += lin(du, c.h2, FFN_UP)
    l_ffn = _lora(lora, weight(FFN_NORM, il))
    dx2, dg_ffn = K.rmsnorm_backward(dh2, c.x2, c.g_ffn, c.rstd2, l_ffn is not None)  # [N, C], [C] or None
    norm_backward(dg_ffn, l_ffn, grads, weight(FFN_NORM, il))
    dx2 += dout
    # attention: x2 = x + [post_attention_norm](wo(attention(rope(q), rope(k), v)))
    do = dx2
    if spec.post_norms:
        do, _ = K.rmsnorm_backward(dx2, c.o, lw[ATTN_POST_NORM], c.rstd_o, False)
    da = lin(do, c.a, ATTN_OUT)  # [N, Cq]
    datt = K.to_heads(da.reshape(B, T, Hq, D))  # [B, Hq, T, D]
    lo = ps.lo(hp, il)
    if flash:
        dqh, dkh, dvh = K.flash_attention_backward(datt, c.qh, c.kh, c.vh, c.att, c.att_cache, hp.attn_scale, lo=lo)
    else:
        dqh, dkh, dvh = K.attention_backward(datt, c.qh, c.kh, c.vh, c.att_cache, hp.attn_scale, lo=lo)
    rope = ps.rope(hp, il)
    dq = rope.backward(dqh).reshape(N, Hq * D)  # [N, Cq]
    dk = rope.backward(dkh).reshape(N, Hkv * D)  # [N, Ckv]
    dv = K.from_heads(dvh).reshape(N, Hkv * D)  # [N, Ckv]
    if spec.qk_norm:
        dq = K.rmsnorm_backward(dq.reshape(-1, D), c.q_raw, lw[ATTN_Q_NORM], c.rstd_q, False)[0].reshape(N, -1)
        dk = K.rmsnorm_backward(dk.reshape(-1, D), c.k_raw, lw[ATTN_K_NORM], c.rstd_k, False)[0].reshape(N, -1)
    l_att = _lora(lora, weight(ATTN_NORM, il))
    if not need_dx and l_att is None:  # only the q, k, v adapters' gradients: no products into dx
        if spec.fused_qkv:
            lin(np.concatenate([dq, dk, dv], axis=1), c.h1, ATTN_QKV, False)
        else:
            for dy, base in ((dq, ATTN_Q), (dk, ATTN_K), (dv, ATTN_V)):
                lin(dy, c.h1, base, False)
        return None
    if spec.fused_qkv:
        dh1 = lin(np.concatenate([dq, dk, dv], axis=1), c.h1, ATTN_QKV)  # [N, C]
    else:
        dh1 = lin(dq, c.h1, ATTN_Q)
        dh1 += lin(dk, c.h1, ATTN_K)
        dh1 += lin(dv, c.h1, ATTN_V)
    dx, dg_att = K.rmsnorm_backward(dh1, c.x, c.g_att, c.rstd1, l_att is not None)  # [N, C], [C] or None
    norm_backward(dg_att, l_att, grads, weight(ATTN_NORM, il))
    dx += dx2
    return dx


def head_loss_backward(weights, hn: np.ndarray, targets: np.ndarray, mask: np.ndarray, inv_norm: float,
                       lora: LoraParams | None, grads: LoraParams | None) -> tuple[np.ndarray, np.ndarray]:
    """Output head + fused softmax-cross-entropy, in row chunks.

    hn [N, C] -> (nll [N] float64, dhn [N, C]); the output adapter's gradients accumulate.
    The logits of a chunk are overwritten in place by their gradient, so no second [n, V] array
    exists; chunks bound the memory to ``head_rows`` rows of logits.  With soft-capping
    (l' = c·tanh(l/c)) the gradient is multiplied by 1 − (l'/c)².
    """
    N, C = hn.shape
    if head_streamed(weights, N, hn.dtype.itemsize):
        return _head_loss_streamed(weights, hn, targets, mask, inv_norm, lora, grads)
    rows = head_rows(weights, N, hn.dtype.itemsize)
    la = _lora(lora, weight(OUTPUT))
    softcap = weights.hp.softcap
    nll = np.empty(N, dtype=np.float64)
    dhn = np.empty_like(hn)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        h = hn[n0:n1]  # [n, C]
        logits, u = head_logits(weights, h, lora)  # [n, V], [n, r]
        t = logits / softcap if softcap else None  # tanh(l/c) of the capped logits
        nll[n0:n1] = K.xent_forward_backward(logits, targets[n0:n1], mask[n0:n1], inv_norm)  # logits := dlogits
        dl = logits
        if t is not None:
            dl *= 1 - t * t
        dh = dhn[n0:n1]
        dh[...] = 0
        for r0, r1, Wc in weights.head_chunks():
            dh += dl[:, r0:r1] @ Wc  # [n, C]
        if la is not None:
            a, b, s = la
            dlb = K.lora_wide_backward(dl, u, b, s, grads.b[weight(OUTPUT)])  # dl·b [n, r]; db += s·dlᵀ·u
            grads.a[weight(OUTPUT)] += s * (h.T @ dlb)  # [C, r]
            K.lora_add(dh, dlb * s, a)
    return nll, dhn


def head_streamed(weights, n_rows: int, itemsize: int) -> bool:
    """Whether the head's loss over ``n_rows`` rows streams the vocabulary (computing the logits
    twice, :func:`_head_loss_streamed`) instead of running in row chunks: when the head is not
    cached and its logits would take more than one row chunk."""
    return not weights.cache_head and head_rows(weights, n_rows, itemsize) < n_rows


def _streamed_logits(weights, hn: np.ndarray, us, b, capped: bool = False):
    """Yield (n0, n1, r0, r1, Wc, logits [n1 − n0, r1 − r0], t or None): the head's logits over
    chunks of the vocabulary (each chunk's rows Wc dequantized once, valid until the next), each in
    blocks of rows so that a block holds at most :func:`logits_bytes`.  With soft-capping the logits
    are capped; ``capped`` also asks for t = capped / c (the backward's 1 − t²)."""
    N = hn.shape[0]
    cols = weights.HEAD_CHUNK_ROWS
    nb = max(1, min(N, logits_bytes(weights) // (cols * hn.dtype.itemsize)))  # rows per block
    buf = np.empty(nb * min(cols, weights.hp.n_vocab), dtype=hn.dtype)
    c = weights.hp.softcap
    for r0, r1, Wc in weights.head_chunks():
        for n0 in range(0, N, nb):
            n1 = min(N, n0 + nb)
            out = buf[: (n1 - n0) * (r1 - r0)].reshape(n1 - n0, r1 - r0)  # contiguous
            np.matmul(hn[n0:n1], Wc.T, out=out)
            if us is not None:
                K.lora_add(out, us[n0:n1], b[r0:r1])
            t = None
            if c:
                out /= c
                np.tanh(out, out=out)
                t = out.copy() if capped else None
                out *= c
            yield n0, n1, r0, r1, Wc, out, t


def _streamed_nll(weights, hn: np.ndarray, targets: np.ndarray, us, b):
    """First pass of a streamed head: nll [N] (float64) and each row's max m [N] and Σ exp(l − m)
    tot [N] over the whole vocabulary (:func:`kernels.xent_stats`)."""
    N = hn.shape[0]
    m = np.full(N, -np.inf, dtype=hn.dtype)
    tot = np.zeros(N)
    lt = np.zeros(N)
    for n0, n1, r0, _, _, logits, _ in _streamed_logits(weights, hn, us, b):
        K.xent_stats(logits, r0, targets[n0:n1], m[n0:n1], tot[n0:n1], lt[n0:n1])
    return np.log(tot) + m - lt, m, tot


def _head_loss_streamed(weights, hn: np.ndarray, targets: np.ndarray, mask: np.ndarray, inv_norm: float,
                        lora: LoraParams | None, grads: LoraParams | None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`head_loss_backward` for a head that is not cached when its logits would take several
    row chunks (a 262k-token vocabulary): each row chunk would dequantize the whole head twice.
    Instead the vocabulary is streamed twice in chunks of columns: once for each row's max and
    Σ exp (:func:`_streamed_nll`), once to recompute each chunk's logits and turn them into their
    gradient (:func:`kernels.xent_grad`).  Two dequantizations of the head and one extra product
    instead of two per row chunk; the logits held at once stay under :func:`logits_bytes`."""
    N = hn.shape[0]
    targets = K._xent_targets(targets, N, weights.hp.n_vocab)
    mask = np.ascontiguousarray(mask, dtype=np.float64)
    la = _lora(lora, weight(OUTPUT))
    u = us = b = None
    if la is not None:
        a, b, s = la
        u = hn @ a  # [N, r]
        us = u * s
    nll, m, tot = _streamed_nll(weights, hn, targets, us, b)
    dhn = np.zeros_like(hn)
    dlb = None if la is None else np.zeros_like(u)
    for n0, n1, r0, r1, Wc, dl, t in _streamed_logits(weights, hn, us, b, capped=True):
        K.xent_grad(dl, r0, targets[n0:n1], m[n0:n1], tot[n0:n1], mask[n0:n1], inv_norm)  # logits := dlogits
        if t is not None:
            dl *= 1 - t * t
        dhn[n0:n1] += dl @ Wc  # [n, C]
        if la is not None:
            dlb[n0:n1] += K.lora_wide_backward(dl, u[n0:n1], b[r0:r1], s, grads.b[weight(OUTPUT)][r0:r1])
    if la is not None:
        grads.a[weight(OUTPUT)] += s * (hn.T @ dlb)  # [C, r]
        K.lora_add(dhn, dlb * s, a)
    return nll, dhn


def embed_backward(dx: np.ndarray, tokens: np.ndarray, weights, lora: LoraParams | None,
                   grads: LoraParams | None) -> None:
    """Token-embedding adapter: e = (W[tok] + s·b[tok]·aᵀ)·scale; db rows scatter-add, da dense."""
    la = _lora(lora, weight(TOKEN_EMBD))
    if la is None:
        return
    scale = embed_scale(weights.hp, dx.dtype)
    if scale is not None:
        dx = dx * scale
    a, b, s = la
    ids = tokens.reshape(-1)
    K.embedding_scatter_add(grads.b[weight(TOKEN_EMBD)], ids, (dx @ a) * s)  # [N, r] into [V, r]
    grads.a[weight(TOKEN_EMBD)] += s * (dx.T @ b[ids])  # [C, r]


def _loss_rows(mask: np.ndarray) -> np.ndarray | None:
    """Indices of the positions with a loss weight, or None when every position has one (then the
    head runs on all rows as they are: the text pipeline's arithmetic stays exactly as before)."""
    keep = np.flatnonzero(mask)
    return None if keep.size == mask.size else keep


def _positions_that_run(tokens, targets, mask, pos, seg_start, flash: bool):
    """The batch as a step runs it: with flash attention without the positions no loss depends on
    (forward.compact_rows); the materialized attention keeps the rows, as its scores would grow with
    the square of one long row."""
    packed = compact_rows(tokens, targets, mask, pos, seg_start) if flash else None
    return (tokens, targets, mask, pos, seg_start) if packed is None else packed


def loss_and_grad(weights, hp: HParams, lora: LoraParams | None, grads: LoraParams | None,
                  tokens: np.ndarray, targets: np.ndarray, mask: np.ndarray, inv_norm: float,
                  checkpointing: bool = True, flash: bool = True, pos: np.ndarray | None = None,
                  seg_start: np.ndarray | None = None) -> float:
    """One batch: tokens/targets [B, T] int, mask [B, T] float -> loss; grads accumulate.

    loss = inv_norm · Σ mask·nll (float64).  With ``grads=None`` only the loss is computed.  Packed
    rows give each position's RoPE position ``pos`` and its record's first position ``seg_start``
    ([B, T]; a record attends only to itself).  The output head runs only on positions whose loss
    weight is not 0, and with flash attention no position after its record's last such one runs at
    all (:func:`_positions_that_run`).
    """
    if grads is None:
        return eval_loss(weights, hp, lora, tokens, targets, mask, inv_norm, flash, pos, seg_start)
    tokens, targets, mask, pos, seg_start = _positions_that_run(tokens, targets, mask, pos, seg_start, flash)
    if tokens.size == 0:  # no position with a loss
        return 0.0
    B, T = tokens.shape
    dtype = weights.dtype
    ps = Positions.make(hp, weights, B, T, pos, seg_start)
    x = embed_forward(weights, tokens, lora)  # [N, C]
    saved: list = []
    for il in range(hp.n_layer):
        lw = weights.layer(il)
        if checkpointing and il < hp.n_layer - 1:
            saved.append(x)
            x, _ = layer_forward(x, lw, il, hp, ps, lora, flash, keep_cache=False)
        else:  # (the last block's cache is used right after the head: kept, not recomputed)
            x, cache = layer_forward(x, lw, il, hp, ps, lora, flash, keep_cache=True)
            saved.append(cache)
    name_on = weight(OUTPUT_NORM)
    g_out = norm_weight(weights.output_norm, _lora(lora, name_on))
    hn, rstd = K.rmsnorm_forward(x, g_out, hp.rms_eps)  # [N, C]
    m = np.ascontiguousarray(mask.reshape(-1), dtype=dtype)
    tg = np.ascontiguousarray(targets.reshape(-1), dtype=np.int32)
    keep = _loss_rows(m)
    if keep is None:
        nll, dhn = head_loss_backward(weights, hn, tg, m, inv_norm, lora, grads)
        loss = float(np.dot(nll, m.astype(np.float64)) * inv_norm)
    else:  # prompts and padding: no head products, a zero gradient
        nll, dsel = head_loss_backward(weights, np.ascontiguousarray(hn[keep]), tg[keep], m[keep], inv_norm, lora,
                                       grads)
        loss = float(np.dot(nll, m[keep].astype(np.float64)) * inv_norm)
        dhn = np.zeros_like(hn)
        dhn[keep] = dsel
    l_out = _lora(lora, name_on)
    dx, dg_out = K.rmsnorm_backward(dhn, x, g_out, rstd, l_out is not None)
    norm_backward(dg_out, l_out, grads, name_on)
    for il in reversed(range(hp.n_layer)):
        lw = weights.layer(il)
        if checkpointing and il < hp.n_layer - 1:
            _, cache = layer_forward(saved[il], lw, il, hp, ps, lora, flash, keep_cache=True,
                                     need_out=False)  # the block's output is not needed again
        else:
            cache = saved[il]
        saved[il] = None  # free as we go
        need_dx = il > 0 or _lora(lora, weight(TOKEN_EMBD)) is not None  # (the embedding's adapter)
        dx = layer_backward(dx, cache, lw, il, hp, ps, lora, grads, flash, need_dx)
    if dx is not None:
        embed_backward(dx, tokens, weights, lora, grads)
    return loss


def eval_loss(weights, hp: HParams, lora: LoraParams | None, tokens: np.ndarray, targets: np.ndarray,
              mask: np.ndarray, inv_norm: float, flash: bool = True, pos: np.ndarray | None = None,
              seg_start: np.ndarray | None = None) -> float:
    """Forward only: inv_norm · Σ mask·nll, logits processed in row chunks (only where mask != 0)."""
    tokens, targets, mask, pos, seg_start = _positions_that_run(tokens, targets, mask, pos, seg_start, flash)
    if tokens.size == 0:
        return 0.0
    hn = forward_hidden(weights, hp, tokens, lora, flash, pos, seg_start)  # [N, C]
    tg = np.ascontiguousarray(targets.reshape(-1), dtype=np.int32)
    m = mask.reshape(-1).astype(np.float64)
    keep = _loss_rows(m)
    if keep is not None:
        hn, tg, m = np.ascontiguousarray(hn[keep]), tg[keep], m[keep]
    if head_streamed(weights, hn.shape[0], hn.dtype.itemsize):  # the vocabulary streamed once
        la = _lora(lora, weight(OUTPUT))
        us = b = None
        if la is not None:
            a, b, s = la
            us = (hn @ a) * s
        nll, _, _ = _streamed_nll(weights, hn, K._xent_targets(tg, hn.shape[0], hp.n_vocab), us, b)
        return float(np.dot(nll, m)) * inv_norm
    rows = head_rows(weights, hn.shape[0], hn.dtype.itemsize)
    total = 0.0
    for n0 in range(0, hn.shape[0], rows):
        n1 = min(hn.shape[0], n0 + rows)
        logits, _ = head_logits(weights, hn[n0:n1], lora)
        total += float(np.dot(K.xent_forward(logits, tg[n0:n1]), m[n0:n1]))
    return total * inv_norm
