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

from ..lora import LoraParams
from ..model import HParams
from . import kernels as K
from .forward import (
    LayerCache,
    Rope,
    _lora,
    embed_forward,
    forward_hidden,
    head_logits,
    head_rows,
    layer_forward,
    norm_weight,
)


def linear_backward(dy: np.ndarray, x: np.ndarray, W: np.ndarray, lora, u, grads: LoraParams | None,
                    name: str) -> np.ndarray:
    """Backward of y = x·Wᵀ + s·(x·a)·bᵀ: dy [N, n_out] -> dx [N, n_in]; da, db accumulate."""
    dx = dy @ W  # [N, n_in]
    if lora is None:
        return dx
    a, b, s = lora
    dyb = K.lora_forward(dy, b, a, s, dx)  # dyb = dy·b [N, r]; dx += s·dyb·aᵀ
    grads.b[name] += s * (dy.T @ u)  # [n_out, r]
    grads.a[name] += s * (x.T @ dyb)  # [n_in, r]
    return dx


def norm_backward(dg: np.ndarray, lora, grads: LoraParams | None, name: str) -> None:
    """Chain the norm-weight gradient dg [C] into its adapter: g' = g + s·a·b[0]."""
    if lora is None:
        return
    a, b, s = lora
    grads.a[name] += s * np.outer(dg, b[0])  # [C, r]
    grads.b[name][0] += s * (a.T @ dg)  # [r]


def layer_backward(dout: np.ndarray, c: LayerCache, lw, il: int, hp: HParams, B: int, T: int, rope: Rope,
                   lora: LoraParams | None, grads: LoraParams | None, flash: bool) -> np.ndarray:
    """Backward of one block: dout [N, C] -> dx [N, C]; LoRA gradients accumulate in ``grads``."""
    Hq, Hkv, D = hp.n_head, hp.n_head_kv, hp.head_dim
    N = B * T
    p = f"blk.{il}."
    n_q, n_k, n_v, n_o = (p + n + ".weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output"))
    n_g, n_u, n_d = (p + n + ".weight" for n in ("ffn_gate", "ffn_up", "ffn_down"))
    # feed-forward: out = x2 + down(swiglu(gate(h2), up(h2)))
    dhf = linear_backward(dout, c.hf, lw.ffn_down, _lora(lora, n_d), c.u_d, grads, n_d)  # [N, F]
    dg, du = K.swiglu_backward(dhf, c.g, c.u)  # [N, F] each
    dh2 = linear_backward(dg, c.h2, lw.ffn_gate, _lora(lora, n_g), c.u_g, grads, n_g)  # [N, C]
    dh2 += linear_backward(du, c.h2, lw.ffn_up, _lora(lora, n_u), c.u_u, grads, n_u)
    l_ffn = _lora(lora, p + "ffn_norm.weight")
    dx2, dg_ffn = K.rmsnorm_backward(dh2, c.x2, c.g_ffn, c.rstd2, l_ffn is not None)  # [N, C], [C] or None
    norm_backward(dg_ffn, l_ffn, grads, p + "ffn_norm.weight")
    dx2 += dout
    # attention: x2 = x + wo(attention(rope(wq h1), rope(wk h1), wv h1))
    da = linear_backward(dx2, c.a, lw.attn_output, _lora(lora, n_o), c.u_o, grads, n_o)  # [N, C]
    datt = K.to_heads(da.reshape(B, T, Hq, D))  # [B, Hq, T, D]
    scale = 1.0 / np.sqrt(D)
    if flash:
        dqh, dkh, dvh = K.flash_attention_backward(datt, c.qh, c.kh, c.vh, c.att, c.att_cache, scale)
    else:
        dqh, dkh, dvh = K.attention_backward(datt, c.qh, c.kh, c.vh, c.att_cache, scale)
    dq = K.rope_backward(dqh, rope.cos, rope.sin, rope.n_rot).reshape(N, Hq * D)  # [N, Hq*D]
    dk = K.rope_backward(dkh, rope.cos, rope.sin, rope.n_rot).reshape(N, Hkv * D)  # [N, Hkv*D]
    dv = K.from_heads(dvh).reshape(N, Hkv * D)  # [N, Hkv*D]
    dh1 = linear_backward(dq, c.h1, lw.attn_q, _lora(lora, n_q), c.u_q, grads, n_q)  # [N, C]
    dh1 += linear_backward(dk, c.h1, lw.attn_k, _lora(lora, n_k), c.u_k, grads, n_k)
    dh1 += linear_backward(dv, c.h1, lw.attn_v, _lora(lora, n_v), c.u_v, grads, n_v)
    l_att = _lora(lora, p + "attn_norm.weight")
    dx, dg_att = K.rmsnorm_backward(dh1, c.x, c.g_att, c.rstd1, l_att is not None)  # [N, C], [C] or None
    norm_backward(dg_att, l_att, grads, p + "attn_norm.weight")
    dx += dx2
    return dx


def head_loss_backward(weights, hn: np.ndarray, targets: np.ndarray, mask: np.ndarray, inv_norm: float,
                       lora: LoraParams | None, grads: LoraParams | None) -> tuple[np.ndarray, np.ndarray]:
    """Output head + fused softmax-cross-entropy, in row chunks.

    hn [N, C] -> (nll [N] float64, dhn [N, C]); the output adapter's gradients accumulate.
    The logits of a chunk are overwritten in place by their gradient, so no second [n, V] array
    exists; chunks bound the memory to ``head_rows`` rows of logits.
    """
    N, C = hn.shape
    V = weights.hp.n_vocab
    la = _lora(lora, "output.weight")
    nll = np.empty(N, dtype=np.float64)
    dhn = np.empty_like(hn)
    rows = head_rows(weights, N, hn.dtype.itemsize)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        h = hn[n0:n1]  # [n, C]
        logits, u = head_logits(weights, h, lora)  # [n, V], [n, r]
        nll[n0:n1] = K.xent_forward_backward(logits, targets[n0:n1], mask[n0:n1], inv_norm)  # logits := dlogits
        dl = logits
        dh = dhn[n0:n1]
        dh[...] = 0
        for r0, r1, Wc in weights.head_chunks():
            dh += dl[:, r0:r1] @ Wc  # [n, C]
        if la is not None:
            a, b, s = la
            dlb = K.lora_wide_backward(dl, u, b, s, grads.b["output.weight"])  # dl·b [n, r]; db += s·dlᵀ·u
            grads.a["output.weight"] += s * (h.T @ dlb)  # [C, r]
            K.lora_add(dh, dlb * s, a)
    return nll, dhn


def embed_backward(dx: np.ndarray, tokens: np.ndarray, lora: LoraParams | None, grads: LoraParams | None) -> None:
    """Token-embedding adapter: e = W[tok] + s·b[tok]·aᵀ; db rows scatter-add, da dense."""
    la = _lora(lora, "token_embd.weight")
    if la is None:
        return
    a, b, s = la
    ids = tokens.reshape(-1)
    K.embedding_scatter_add(grads.b["token_embd.weight"], ids, (dx @ a) * s)  # [N, r] into [V, r]
    grads.a["token_embd.weight"] += s * (dx.T @ b[ids])  # [C, r]


def loss_and_grad(weights, hp: HParams, lora: LoraParams | None, grads: LoraParams | None,
                  tokens: np.ndarray, targets: np.ndarray, mask: np.ndarray, inv_norm: float,
                  checkpointing: bool = True, flash: bool = True) -> float:
    """One batch: tokens/targets [B, T] int, mask [B, T] float -> loss; grads accumulate.

    loss = inv_norm · Σ mask·nll (float64).  With ``grads=None`` only the loss is computed.
    """
    B, T = tokens.shape
    dtype = weights.dtype
    if grads is None:
        return eval_loss(weights, hp, lora, tokens, targets, mask, inv_norm, flash)
    rope = Rope.make(hp, T, dtype)
    x = embed_forward(weights, tokens, lora)  # [N, C]
    saved: list = []
    for il in range(hp.n_layer):
        lw = weights.layer(il)
        if checkpointing and il < hp.n_layer - 1:
            saved.append(x)
            x, _ = layer_forward(x, lw, il, hp, B, T, rope, lora, flash, keep_cache=False)
        else:  # (the last block's cache is used right after the head: kept, not recomputed)
            x, cache = layer_forward(x, lw, il, hp, B, T, rope, lora, flash, keep_cache=True)
            saved.append(cache)
    name_on = "output_norm.weight"
    g_out = norm_weight(weights.output_norm, _lora(lora, name_on))
    hn, rstd = K.rmsnorm_forward(x, g_out, hp.rms_eps)  # [N, C]
    m = np.ascontiguousarray(mask.reshape(-1), dtype=dtype)
    nll, dhn = head_loss_backward(weights, hn, np.ascontiguousarray(targets.reshape(-1), dtype=np.int32),
                                  m, inv_norm, lora, grads)
    loss = float(np.dot(nll, m.astype(np.float64)) * inv_norm)
    l_out = _lora(lora, name_on)
    dx, dg_out = K.rmsnorm_backward(dhn, x, g_out, rstd, l_out is not None)
    norm_backward(dg_out, l_out, grads, name_on)
    for il in reversed(range(hp.n_layer)):
        lw = weights.layer(il)
        if checkpointing and il < hp.n_layer - 1:
            _, cache = layer_forward(saved[il], lw, il, hp, B, T, rope, lora, flash, keep_cache=True,
                                     need_out=False)  # the block's output is not needed again
        else:
            cache = saved[il]
        saved[il] = None  # free as we go
        dx = layer_backward(dx, cache, lw, il, hp, B, T, rope, lora, grads, flash)
    embed_backward(dx, tokens, lora, grads)
    return loss


def eval_loss(weights, hp: HParams, lora: LoraParams | None, tokens: np.ndarray, targets: np.ndarray,
              mask: np.ndarray, inv_norm: float, flash: bool = True) -> float:
    """Forward only: inv_norm · Σ mask·nll, logits processed in row chunks."""
    hn = forward_hidden(weights, hp, tokens, lora, flash)  # [N, C]
    tg = np.ascontiguousarray(targets.reshape(-1), dtype=np.int32)
    m = mask.reshape(-1).astype(np.float64)
    rows = head_rows(weights, hn.shape[0], hn.dtype.itemsize)
    total = 0.0
    for n0 in range(0, hn.shape[0], rows):
        n1 = min(hn.shape[0], n0 + rows)
        logits, _ = head_logits(weights, hn[n0:n1], lora)
        total += float(np.dot(K.xent_forward(logits, tg[n0:n1]), m[n0:n1]))
    return total * inv_norm
