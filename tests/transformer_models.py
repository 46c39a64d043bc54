"""Tiny vision transformers built in code: a ViT (class token, optional register tokens) and a
Swin-like model that keeps NHWC maps. Written out by hand (no nn.TransformerEncoderLayer fast
path) so they export to the plain ONNX ops a deployed ViT has: LayerNormalization, MatMul,
Softmax, Erf (GELU), Concat, Gather."""
from __future__ import annotations

import torch

nn = torch.nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (N, L, C)
        n, length, c = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, length, c))


class Block(nn.Module):
    """Pre-norm transformer block over the last axis (tokens (N, L, C) or NHWC maps with ``spatial``)."""

    def __init__(self, dim: int, heads: int, spatial: bool = False):
        super().__init__()
        self.spatial = spatial
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        if self.spatial:  # NHWC: attention over all h·w positions (one window)
            n, h, w, c = x.shape
            x = x + self.attn(self.norm1(x).reshape(n, h * w, c)).reshape(n, h, w, c)
        else:
            x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding (conv), class token (+ ``registers`` register tokens), position embedding,
    ``depth`` blocks, final LayerNorm; the head reads the class token (as torchvision's ViT)."""

    def __init__(self, size: int = 32, patch: int = 4, dim: int = 32, depth: int = 2, heads: int = 2,
                 classes: int = 2, registers: int = 0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        grid = size // patch
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.registers = nn.Parameter(torch.randn(1, registers, dim) * 0.02) if registers else None
        self.pos = nn.Parameter(torch.randn(1, grid * grid, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos  # (N, h·w, C)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.registers is not None:
            prefix.append(self.registers.expand(x.shape[0], -1, -1))
        x = self.norm(self.blocks(torch.cat(prefix + [x], dim=1)))
        return self.head(x[:, 0])


class TinySwin(nn.Module):
    """Swin-like: patch embedding permuted to NHWC, blocks on NHWC maps, a patch-merging step
    (2×2 → 1 on NHWC), final LayerNorm on NHWC and mean pooling over (h, w) — no Permute module
    anywhere, so the explained NHWC map must be recognised by its shape."""

    def __init__(self, size: int = 32, patch: int = 4, dim: int = 16, heads: int = 2, classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.stage1 = Block(dim, heads, spatial=True)
        self.merge = nn.Linear(4 * dim, 2 * dim)
        self.stage2 = Block(2 * dim, heads, spatial=True)
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, classes)

    def forward(self, x):
        x = self.stage1(self.patch_embed(x).permute(0, 2, 3, 1))  # NHWC from here on
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        x = self.norm(self.stage2(self.merge(x)))
        return self.head(x.mean(dim=(1, 2)))


class ResidualCNN(nn.Module):
    """Two residual stages; the explained map is the last ReLU before global pooling."""

    def __init__(self, classes: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(self.act(self.down(x)).mean(dim=(2, 3)))
