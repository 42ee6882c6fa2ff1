"""The 3D vision encoder (ViT over 32x32x4 patches) of RadFM.

Submodule names and ``nn.Sequential`` indices follow the released checkpoint
(``embedding_layer.vision_encoder.*``) so its state dict loads without renaming.
Attention goes through ``scaled_dot_product_attention``; the maths is the official one.
"""

import torch
import torch.nn.functional as F
from torch import nn


class PatchesToTokens(nn.Module):
    """``b c (h p1) (w p2) (f pf) -> b (h w f) (p1 p2 pf c)``: one token per 3D patch."""

    def __init__(self, patch_size: int, frame_patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.frame_patch_size = frame_patch_size

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, c, height, width, depth = video.shape
        p, pf = self.patch_size, self.frame_patch_size
        h, w, f = height // p, width // p, depth // pf
        x = video.reshape(b, c, h, p, w, p, f, pf)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(b, h * w * f, p * p * pf * c)


class PositionEmbedding3d(nn.Module):
    """Learned row/column/depth embeddings, concatenated.

    A volume with fewer patches than the table has picks evenly strided rows
    (``(i + 1) * (table // n) - 1``), exactly as the official code does.
    """

    def __init__(self, num_pos_feats: int, h_patches: int, w_patches: int, d_patches: int):
        super().__init__()
        self.row_embed = nn.Embedding(h_patches, num_pos_feats)
        self.col_embed = nn.Embedding(w_patches, num_pos_feats)
        self.dep_embed = nn.Embedding(d_patches, num_pos_feats)

    @staticmethod
    def _strided(table: nn.Embedding, n: int) -> torch.Tensor:
        idx = (torch.arange(n, device=table.weight.device) + 1) * (table.num_embeddings // n) - 1
        return table(idx)

    def forward(self, h: int, w: int, d: int) -> torch.Tensor:
        rows = self._strided(self.row_embed, h)[:, None, None, :].expand(h, w, d, -1)
        cols = self._strided(self.col_embed, w)[None, :, None, :].expand(h, w, d, -1)
        deps = self._strided(self.dep_embed, d)[None, None, :, :].expand(h, w, d, -1)
        return torch.cat([rows, cols, deps], dim=-1).reshape(1, h * w * d, -1)


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        # Indices 2 and 4 were dropout layers in training; keep the numbering of the checkpoint.
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim), nn.GELU(), nn.Identity(), nn.Linear(hidden_dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, heads * dim_head * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class VisionTransformer3d(nn.Module):
    """3D ViT: patch tokens plus learned 3D positions through pre-norm transformer blocks."""

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        patch_size: int,
        frame_patch_size: int,
        h_patches: int,
        w_patches: int,
        d_patches: int,
        channels: int = 3,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.frame_patch_size = frame_patch_size
        patch_dim = channels * patch_size * patch_size * frame_patch_size
        self.to_patch_embedding = nn.Sequential(
            PatchesToTokens(patch_size, frame_patch_size),
            nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, dim),
            nn.LayerNorm(dim),
        )
        self.pos_embedding = PositionEmbedding3d(dim // 3, h_patches, w_patches, d_patches)
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PreNorm(dim, SelfAttention(dim, heads, dim_head)),
                    PreNorm(dim, FeedForward(dim, mlp_dim)),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W, D]`` -> patch features ``[B, (H/32)(W/32)(D/4), dim]``."""
        _, channels, height, width, depth = video.shape
        if channels > 1 and video.stride(1) == 0:  # one gray volume seen as 3 channels (preprocess's view)
            x = self._embed_gray(video[:, :1])
        else:
            x = self.to_patch_embedding(video)
        x = x + self.pos_embedding(
            height // self.patch_size, width // self.patch_size, depth // self.frame_patch_size
        )
        for attn, ff in self.transformer.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x

    def _embed_gray(self, gray: torch.Tensor) -> torch.Tensor:
        """The patch embedding of ``[B, 1, H, W, D]`` repeated to every channel, on a third of the data.

        A token is ``(p1 p2 pf c)`` with ``c`` innermost, so each gray value appears once per
        channel in a row: the LayerNorm's mean and variance are the gray values' own, and the
        linear layer's columns of one value (scaled by the norm's weight) add up to one column.
        """
        to_tokens, norm, linear, out_norm = self.to_patch_embedding
        x = to_tokens(gray)  # [B, N, p * p * pf]
        x = F.layer_norm(x, x.shape[-1:], eps=norm.eps)
        weight = (linear.weight * norm.weight).view(linear.out_features, x.shape[-1], -1).sum(-1)
        bias = torch.addmv(linear.bias, linear.weight, norm.bias)
        return out_norm(F.linear(x, weight, bias))
