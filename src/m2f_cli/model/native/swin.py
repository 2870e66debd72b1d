"""The Swin Transformer backbone as Mask2Former uses it (four stages, each stage's output before
its patch merging, layer-normed), with the module names of the checkpoints' weights.

Same arithmetic as transformers' ``SwinBackbone`` (``always_partition``: 7x7 windows at every
resolution, the feature maps padded to whole windows, every second block shifted by half a
window with the -100 mask between the cyclic regions), written for inference: the window
attention goes through ``scaled_dot_product_attention`` with the relative position bias and the
shift mask as one additive mask built once per stage, not per block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Dense(nn.Module):
    """A Linear under the name ``dense`` (the checkpoints' ``intermediate.dense``, ``output.dense``)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.key = nn.Linear(dim, dim, bias=qkv_bias)
        self.value = nn.Linear(dim, dim, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", _relative_index(window), persistent=False)

    def bias(self) -> torch.Tensor:
        """(heads, w*w, w*w): each pair of window positions' learned bias."""
        n = self.relative_position_index.shape[0]
        return self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)


class _WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, qkv_bias: bool):
        super().__init__()
        self.self = _SelfAttention(dim, heads, window, qkv_bias)
        self.output = _Dense(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (windows, w*w, C); mask (windows or 1, heads, w*w, w*w), additive."""
        a = self.self
        n, t, c = x.shape
        shape = (n, t, a.heads, c // a.heads)
        q = a.query(x).view(shape).transpose(1, 2)
        k = a.key(x).view(shape).transpose(1, 2)
        v = a.value(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
        return self.output.dense(out.transpose(1, 2).reshape(n, t, c))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float, qkv_bias: bool,
                 eps: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.layernorm_before = nn.LayerNorm(dim, eps=eps)
        self.attention = _WindowAttention(dim, heads, window, qkv_bias)
        self.layernorm_after = nn.LayerNorm(dim, eps=eps)
        self.intermediate = _Dense(dim, int(mlp_ratio * dim))
        self.output = _Dense(int(mlp_ratio * dim), dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], shift_mask: torch.Tensor | None) -> torch.Tensor:
        h, w = hw
        b, _, c = x.shape
        ws, s = self.window, self.shift
        y = self.layernorm_before(x).view(b, h, w, c)
        y = F.pad(y, (0, 0, 0, (-w) % ws, 0, (-h) % ws))
        hp, wp = y.shape[1], y.shape[2]
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        windows = _partition(y, ws)
        bias = self.attention.self.bias().unsqueeze(0).to(windows.dtype)
        if s:
            # (windows of one image, 1, t, t) + (1, heads, t, t), repeated per image of the batch
            bias = (shift_mask + bias).repeat(b, 1, 1, 1)
        y = _reverse(self.attention(windows, bias), ws, hp, wp)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        y = y[:, :h, :w, :].reshape(b, h * w, c)
        x = x + y
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class _PatchMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        h, w = hw
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class _Stage(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_ratio: float, qkv_bias: bool,
                 eps: float, downsample: bool):
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, qkv_bias, eps)
            for i in range(depth))
        self.downsample = _PatchMerging(dim) if downsample else None


class _PatchEmbeddings(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.projection = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.patch
        if h % p or w % p:
            x = F.pad(x, (0, (-w) % p, 0, (-h) % p))
        return self.projection(x)


class _Embeddings(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int):
        super().__init__()
        self.patch_embeddings = _PatchEmbeddings(channels, dim, patch)
        self.norm = nn.LayerNorm(dim)


class _Encoder(nn.Module):
    def __init__(self, stages: list[_Stage]):
        super().__init__()
        self.layers = nn.ModuleList(stages)


class SwinBackbone(nn.Module):
    """pixel_values (B, 3, H, W) -> the four stages' feature maps (B, C_i, H/4/2^i, W/4/2^i),
    rounded up as the patches and merges pad."""

    def __init__(self, cfg: dict):
        super().__init__()
        dim, depths, heads = int(cfg["embed_dim"]), list(cfg["depths"]), list(cfg["num_heads"])
        window, eps = int(cfg["window_size"]), float(cfg.get("layer_norm_eps", 1e-5))
        mlp, qkv = float(cfg.get("mlp_ratio", 4.0)), bool(cfg.get("qkv_bias", True))
        self.embeddings = _Embeddings(int(cfg.get("num_channels", 3)), dim, int(cfg.get("patch_size", 4)))
        self.encoder = _Encoder([
            _Stage(dim * 2 ** i, depths[i], heads[i], window, mlp, qkv, eps, i < len(depths) - 1)
            for i in range(len(depths))])
        self.channels = [dim * 2 ** i for i in range(len(depths))]
        self.hidden_states_norms = nn.ModuleDict(
            {f"stage{i + 1}": nn.LayerNorm(c) for i, c in enumerate(self.channels)})

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        x = self.embeddings.patch_embeddings(pixel_values)
        b, _, h, w = x.shape
        x = self.embeddings.norm(x.flatten(2).transpose(1, 2))
        maps = []
        for i, stage in enumerate(self.encoder.layers):
            shift_mask = _shift_mask(h, w, stage.window, x.dtype, x.device)
            for block in stage.blocks:
                x = block(x, (h, w), shift_mask)
            c = x.shape[-1]
            y = self.hidden_states_norms[f"stage{i + 1}"](x)
            maps.append(y.view(b, h, w, c).permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None:
                x = stage.downsample(x, (h, w))
                h, w = (h + 1) // 2, (w + 1) // 2
        return maps


def _relative_index(window: int) -> torch.Tensor:
    """(w*w, w*w) index into the (2w-1)^2 bias table of each pair of positions in a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window, device="cpu"), torch.arange(window, device="cpu"),
                                        indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def _partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).transpose(2, 3)
    return x.reshape(-1, ws * ws, c)


def _reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c).transpose(2, 3)
    return x.reshape(-1, h, w, c)


def _shift_mask(h: int, w: int, ws: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(windows, 1, t, t): -100 between positions of a shifted window that come from different
    regions of the padded map (the cyclic shift put them side by side), 0 within a region."""
    hp, wp, s = h + (-h) % ws, w + (-w) % ws, ws // 2
    rh = torch.arange(hp, device=device)
    rw = torch.arange(wp, device=device)
    rh = (rh >= hp - ws).long() + (rh >= hp - s).long()
    rw = (rw >= wp - ws).long() + (rw >= wp - s).long()
    regions = (rh[None, :, None, None] * 3 + rw[None, None, :, None]).to(dtype)
    m = _partition(regions, ws).squeeze(-1)
    diff = m.unsqueeze(1) - m.unsqueeze(2)
    return torch.where(diff != 0, -100.0, 0.0).to(dtype).unsqueeze(1)
