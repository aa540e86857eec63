"""Masked [OBJ] attention that keeps the fused kernel for the patch rows (spec §4, issue 5).

Only row 0 (the [OBJ] query) of each block's attention is masked; rows 1.. attend to every
key. A dense (B, 1, 1 + N, 1 + N) boolean mask makes SDPA give up its flash kernel for all
1 + N rows (about 1.7x the attention time on an H100, issue 5). The split path instead runs
unmasked SDPA for all queries (flash on GPU), keeps its patch rows and computes the
[OBJ] row apart with two
small batched matrix-vector products and a masked softmax, then concatenates: the same
numbers. The [OBJ] row is written out rather than given to a second SDPA call because
fused kernels tile queries in blocks of 64-128 rows: a one-row query would cost a whole
tile per (image, head), a sizeable share of the full attention again (issue 5 measured
"flash + separate masked [OBJ] attention" at 1.08 ms against 0.55 ms unmasked). Written
out, the row reads K and V once more and adds a rank-1 term to their gradients:
memory-bound work of a few percent of the attention (GPU figure pending, see
docs/benchmarks.md).

Both paths reuse the timm block's own modules (norms, qkv, projections, layer scale,
drop-path), so the weights and key names stay timm's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# "auto": split on GPUs, where unmasked SDPA is a flash kernel that a mask would forbid;
# dense on CPU, whose fused SDPA takes the mask at little cost (measured there: dense
# 1.00-1.08x and split 1.22-1.25x the unmasked attention time, docs/benchmarks.md).
ATTENTION_IMPLS = ("auto", "split", "dense")


def obj_attention_mask(obj_patch_mask: torch.Tensor) -> torch.Tensor:
    """Boolean SDPA mask from a per-patch object mask (the dense reference path).

    obj_patch_mask: (B, N) bool, True where the [OBJ] query may attend to patch n.
    Returns (B, 1, 1 + N, 1 + N) bool, True = attend: row 0 ([OBJ]) sees its own key and the
    object's patches; rows 1.. (patches) see everything.
    """
    batch, n_patches = obj_patch_mask.shape
    mask = torch.ones(
        batch, 1, 1 + n_patches, 1 + n_patches, dtype=torch.bool, device=obj_patch_mask.device
    )
    mask[:, 0, 0, 1:] = obj_patch_mask
    return mask


def obj_row_mask(obj_patch_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) object mask -> (B, 1, 1, 1 + N) bool keys of the [OBJ] query ([OBJ] key kept)."""
    keep_obj_key = obj_patch_mask.new_ones(obj_patch_mask.shape[0], 1)
    return torch.cat([keep_obj_key, obj_patch_mask], dim=1)[:, None, None, :]


def supports_split_attention(block: nn.Module) -> bool:
    """True for timm's plain pre-norm `Block` with a standard `Attention` (ViT-Ti/S/B/L)."""
    attn = getattr(block, "attn", None)
    needed = ("norm1", "norm2", "mlp", "ls1", "ls2", "drop_path1", "drop_path2")
    return (
        attn is not None
        and all(hasattr(block, name) for name in needed)
        and all(hasattr(attn, name) for name in ("qkv", "num_heads", "head_dim", "proj"))
        and getattr(attn, "gate", None) is None
    )


def split_obj_attention(attn: nn.Module, x: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """timm `Attention.forward` with the [OBJ] row masked: unmasked SDPA + the row apart.

    x: (B, 1 + N, C) normalised tokens; row_mask: (B, 1, 1, 1 + N) bool from `obj_row_mask`.
    Returns (B, 1 + N, C), equal to the dense-masked attention.
    """
    batch, n_tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, n_tokens, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, 1 + N, d)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout = attn.attn_drop.p if attn.training else 0.0
    # No mask at all: SDPA may pick its flash kernel. Row 0 is computed too (one row more
    # than the patches need, no slicing copies of q) and replaced by the masked [OBJ] row.
    all_rows = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    obj_row = obj_row_attention(q[:, :, :1], k, v, row_mask, attn.scale, dropout)
    # The concatenation is the (B, H, T, d) -> (B, T, H*d) copy timm makes anyway.
    out = torch.cat([obj_row.transpose(1, 2), all_rows.transpose(1, 2)[:, 1:]], dim=1)
    out = out.reshape(batch, n_tokens, attn.attn_dim)
    out = attn.norm(out)
    return attn.proj_drop(attn.proj(out))


def obj_row_attention(
    q_obj: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    row_mask: torch.Tensor,
    scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The [OBJ] query's attention, written out: q_obj (B, H, 1, d), k and v (B, H, 1 + N, d),
    row_mask (B, 1, 1, 1 + N) bool -> (B, H, 1, d). Softmax in float32 (bf16 logits would
    lose the small weights)."""
    logits = torch.matmul(q_obj * scale, k.transpose(-2, -1)).float()
    logits = logits.masked_fill(~row_mask, float("-inf"))
    weights = F.dropout(logits.softmax(dim=-1), p=dropout).to(v.dtype)
    return torch.matmul(weights, v)


def split_block_forward(block: nn.Module, x: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """timm `Block.forward` with `split_obj_attention` in place of the block's attention."""
    x = x + block.drop_path1(block.ls1(split_obj_attention(block.attn, block.norm1(x), row_mask)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


# Read-out [OBJ] tokens (issue 19): K [OBJ] tokens per image, each attending to its own key
# and its object's patches; no row attends to any [OBJ] key, so the patch stream is the same
# whichever objects are asked for (CaiT's class-attention tokens read patches the same way)
# and K objects cost one pass of K + N tokens instead of K passes of 1 + N. Layout: tokens
# 0..K-1 are the [OBJ] tokens, K.. the patches. A padding token (an image with fewer objects
# than the batch's K) gets an all-false row: it sees its own key only, and no one sees it.


def readout_attention_mask(obj_patch_masks: torch.Tensor) -> torch.Tensor:
    """(B, K, N) bool object masks -> (B, 1, K + N, K + N) bool SDPA mask (True = attend):
    [OBJ] row i sees key i and its object's patches; patch rows see the N patch keys only."""
    batch, n_obj, n_patches = obj_patch_masks.shape
    size = n_obj + n_patches
    mask = torch.zeros(batch, size, size, dtype=torch.bool, device=obj_patch_masks.device)
    mask[:, :n_obj, n_obj:] = obj_patch_masks
    mask[:, n_obj:, n_obj:] = True
    own = torch.arange(n_obj, device=obj_patch_masks.device)
    mask[:, own, own] = True
    return mask[:, None]


def readout_rows_attention(
    q_obj: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    obj_patch_masks: torch.Tensor,
    scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The K read-out rows written out: q_obj (B, H, K, d), k and v (B, H, K + N, d),
    obj_patch_masks (B, K, N) bool -> (B, H, K, d). Row i's keys: [OBJ]_i and its patches.
    Softmax in float32, as in `obj_row_attention`."""
    n_obj = q_obj.shape[2]
    q_scaled = q_obj * scale
    own = (q_scaled * k[:, :, :n_obj]).sum(dim=-1, keepdim=True)  # (B, H, K, 1)
    to_patches = torch.matmul(q_scaled, k[:, :, n_obj:].transpose(-2, -1))  # (B, H, K, N)
    to_patches = to_patches.float().masked_fill(~obj_patch_masks[:, None], float("-inf"))
    logits = torch.cat([own.float(), to_patches], dim=-1)
    weights = F.dropout(logits.softmax(dim=-1), p=dropout).to(v.dtype)
    return weights[..., :1] * v[:, :, :n_obj] + torch.matmul(weights[..., 1:], v[:, :, n_obj:])


def split_readout_attention(
    attn: nn.Module, x: torch.Tensor, obj_patch_masks: torch.Tensor
) -> torch.Tensor:
    """timm `Attention.forward` for read-out tokens: unmasked SDPA over the N patch rows
    and keys (flash on GPU), the K [OBJ] rows apart. x: (B, K + N, C) normalised tokens,
    obj_patch_masks (B, K, N) bool. Equal to SDPA with `readout_attention_mask`."""
    batch, n_tokens, _ = x.shape
    n_obj = obj_patch_masks.shape[1]
    qkv = attn.qkv(x).reshape(batch, n_tokens, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, K + N, d)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout = attn.attn_drop.p if attn.training else 0.0
    patches = F.scaled_dot_product_attention(
        q[:, :, n_obj:], k[:, :, n_obj:], v[:, :, n_obj:], dropout_p=dropout
    )
    objs = readout_rows_attention(q[:, :, :n_obj], k, v, obj_patch_masks, attn.scale, dropout)
    out = torch.cat([objs, patches], dim=2).transpose(1, 2).reshape(batch, n_tokens, attn.attn_dim)
    out = attn.norm(out)
    return attn.proj_drop(attn.proj(out))


def split_readout_block_forward(
    block: nn.Module, x: torch.Tensor, obj_patch_masks: torch.Tensor
) -> torch.Tensor:
    """timm `Block.forward` with `split_readout_attention` in place of the block's attention."""
    attended = split_readout_attention(block.attn, block.norm1(x), obj_patch_masks)
    x = x + block.drop_path1(block.ls1(attended))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
