"""Mask2Former's pixel decoder (multi-scale deformable attention encoder + one FPN level) and its
masked-attention transformer decoder, with the module names of the checkpoints' weights.

Same arithmetic as transformers' ``Mask2FormerPixelDecoder`` and ``Mask2FormerTransformerModule``
at inference on unpadded batches (no pixel mask: every valid ratio is 1), written batch-first.
Only what the instance outputs need is computed: the last decoder layer's class logits and mask
logits (transformers also computes every layer's class logits and the last layer's attention
mask, which nothing reads). Attention goes through ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from m2f_cli.model import deformable

LEVELS = 3  # feature levels the encoder and the decoder's cross-attention use (Mask2Former's)
POINTS = 4  # sampling points per level and head in the deformable attention


def sine_positions(shape: torch.Size, dtype: torch.dtype, device: torch.device, features: int) -> torch.Tensor:
    """(B, 2*features, H, W): DETR's normalised sine position embedding (y then x). The same few
    sizes come back on every forward (the pixel decoder's and the transformer decoder's levels are
    the same three maps), so each is computed once (~4 ms of an eager forward otherwise); callers
    never write into it."""
    b, _, h, w = shape
    return _sine_positions(b, h, w, dtype, device, features)


@functools.lru_cache(maxsize=8)
def _sine_positions(b: int, h: int, w: int, dtype: torch.dtype, device: torch.device, features: int) -> torch.Tensor:
    y = torch.arange(1, h + 1, dtype=dtype, device=device)[None, :, None].expand(b, h, w)
    x = torch.arange(1, w + 1, dtype=dtype, device=device)[None, None, :].expand(b, h, w)
    scale, eps = 2 * math.pi, 1e-6
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(features, dtype=torch.int64, device=device).to(dtype)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / features)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


def _grid_sample_attention(value, shapes, locations, weights):
    """The reference multi-scale deformable attention (grid_sample per level), for devices and
    dtypes the CPU version (model/deformable.py) does not serve. Shapes as there."""
    b, _, heads, c = value.shape
    _, q, _, levels, points, _ = locations.shape
    grids = 2 * locations - 1
    samples = []
    for lvl, (part, (h, w)) in enumerate(zip(value.split([h * w for h, w in shapes], dim=1), shapes)):
        v = part.flatten(2).transpose(1, 2).reshape(b * heads, c, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    wts = weights.transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    out = (torch.stack(samples, dim=-2).flatten(-2) * wts).sum(-1).view(b, heads * c, q)
    return out.transpose(1, 2).contiguous()


def _deformable(value, shapes, locations, weights):
    if value.device.type == "cpu" and value.dtype in deformable.FAST_DTYPES and deformable.enabled():
        return deformable.multi_scale_deformable_attention(value.float(), shapes, locations.float(), weights.float())
    return _grid_sample_attention(value, shapes, locations, weights)


class _DeformableAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.sampling_offsets = nn.Linear(dim, heads * LEVELS * POINTS * 2)
        self.attention_weights = nn.Linear(dim, heads * LEVELS * POINTS)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(self, x, pos, reference, shapes):
        b, s, dim = x.shape
        query = x + pos
        value = self.value_proj(x).view(b, s, self.heads, dim // self.heads)
        offsets = self.sampling_offsets(query).view(b, s, self.heads, LEVELS, POINTS, 2)
        weights = self.attention_weights(query).view(b, s, self.heads, LEVELS * POINTS)
        weights = weights.softmax(-1).view(b, s, self.heads, LEVELS, POINTS)
        normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.long, device=x.device)
        locations = reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return self.output_proj(_deformable(value, shapes, locations, weights))


class _EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = _DeformableAttention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x, pos, reference, shapes):
        x = self.self_attn_layer_norm(x + self.self_attn(x, pos, reference, shapes))
        return self.final_layer_norm(x + self.fc2(F.relu(self.fc1(x))))


class _Encoder(nn.Module):
    def __init__(self, layers: list[_EncoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class PixelDecoder(nn.Module):
    """Backbone maps -> (mask features (B, mask_dim, H/4, W/4), the 3 coarsest levels after the
    encoder, coarsest first)."""

    def __init__(self, cfg: dict, channels: list[int]):
        super().__init__()
        dim, strides = int(cfg["feature_size"]), list(cfg["feature_strides"])
        self.pos_features = dim // 2
        self.level_embed = nn.Parameter(torch.zeros(LEVELS, dim))
        self.input_projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, kernel_size=1), nn.GroupNorm(32, dim)) for c in channels[-LEVELS:][::-1])
        heads, ffn = int(cfg["num_attention_heads"]), int(cfg["encoder_feedforward_dim"])
        self.encoder = _Encoder([_EncoderLayer(dim, heads, ffn) for _ in range(int(cfg["encoder_layers"]))])
        self.mask_projection = nn.Conv2d(dim, int(cfg["mask_feature_size"]), kernel_size=1)
        self.fpn_levels = int(math.log2(min(strides[-LEVELS:])) - math.log2(int(cfg["common_stride"])))
        for i, c in enumerate(channels[:self.fpn_levels]):
            self.add_module(f"adapter_{i + 1}", nn.Sequential(nn.Conv2d(c, dim, kernel_size=1, bias=False),
                                                              nn.GroupNorm(32, dim)))
            self.add_module(f"layer_{i + 1}", nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False), nn.GroupNorm(32, dim), nn.ReLU()))

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        levels = features[::-1][:LEVELS]
        embeds = [proj(x) for proj, x in zip(self.input_projections, levels)]
        shapes = [(e.shape[2], e.shape[3]) for e in embeds]
        flat = torch.cat([e.flatten(2).transpose(1, 2) for e in embeds], 1)
        pos = torch.cat([sine_positions(x.shape, x.dtype, x.device, self.pos_features).flatten(2).transpose(1, 2)
                         + self.level_embed[i].view(1, 1, -1) for i, x in enumerate(levels)], 1)
        reference = _reference_points(shapes, flat.shape[0], flat.dtype, flat.device)
        for layer in self.encoder.layers:
            flat = layer(flat, pos, reference, shapes)
        b = flat.shape[0]
        outs = [part.transpose(1, 2).view(b, -1, h, w)
                for part, (h, w) in zip(flat.split([h * w for h, w in shapes], 1), shapes)]
        for i, feature in enumerate(features[:self.fpn_levels][::-1]):
            idx = self.fpn_levels - i
            lateral = getattr(self, f"adapter_{idx}")(feature)
            up = F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(getattr(self, f"layer_{idx}")(lateral + up))
        return self.mask_projection(outs[-1]), outs[:LEVELS]


def _reference_points(shapes, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(B, S, LEVELS, 2): each position's centre as (x, y) in [0, 1], the same on every level."""
    refs = []
    for h, w in shapes:
        ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=dtype, device=device),
                                torch.linspace(0.5, w - 0.5, w, dtype=dtype, device=device), indexing="ij")
        refs.append(torch.stack((rx.reshape(-1) / w, ry.reshape(-1) / h), -1))
    ref = torch.cat(refs, 0)[None].expand(batch, -1, -1)
    return ref[:, :, None].expand(-1, -1, len(shapes), -1)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, pos):
        b, q, d = x.shape
        shape = (b, q, self.heads, d // self.heads)
        xp = x + pos
        qs = self.q_proj(xp).view(shape).transpose(1, 2)
        ks = self.k_proj(xp).view(shape).transpose(1, 2)
        vs = self.v_proj(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(qs, ks, vs)
        return self.out_proj(out.transpose(1, 2).reshape(b, q, d))


def _cross_attention(mha: nn.MultiheadAttention, x, qpos, memory, mpos, allowed):
    """nn.MultiheadAttention's arithmetic, batch-first; allowed (B, heads, Q, S) True where a
    query may look."""
    b, q, d = x.shape
    heads = mha.num_heads
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    qs = F.linear(x + qpos, wq, bq).view(b, q, heads, d // heads).transpose(1, 2)
    ks = F.linear(memory + mpos, wk, bk).view(b, -1, heads, d // heads).transpose(1, 2)
    vs = F.linear(memory, wv, bv).view(b, -1, heads, d // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed)
    return mha.out_proj(out.transpose(1, 2).reshape(b, q, d))


class _DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = _SelfAttention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads)
        self.cross_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x, qpos, memory, mpos, allowed):
        x = self.cross_attn_layer_norm(x + _cross_attention(self.cross_attn, x, qpos, memory, mpos, allowed))
        x = self.self_attn_layer_norm(x + self.self_attn(x, qpos))
        return self.final_layer_norm(x + self.fc2(F.relu(self.fc1(x))))


class _MaskPredictor(nn.Module):
    def __init__(self, dim: int, mask_dim: int):
        super().__init__()
        self.mask_embedder = nn.Sequential(nn.Sequential(nn.Linear(dim, dim), nn.ReLU()),
                                           nn.Sequential(nn.Linear(dim, dim), nn.ReLU()),
                                           nn.Sequential(nn.Linear(dim, mask_dim)))

    def forward(self, x, pixels):
        return torch.einsum("bqc,bchw->bqhw", self.mask_embedder(x), pixels)


class _Decoder(nn.Module):
    def __init__(self, cfg: dict, dim: int):
        super().__init__()
        heads, ffn = int(cfg["num_attention_heads"]), int(cfg["dim_feedforward"])
        self.layers = nn.ModuleList(_DecoderLayer(dim, heads, ffn) for _ in range(int(cfg["decoder_layers"]) - 1))
        self.layernorm = nn.LayerNorm(dim)
        self.mask_predictor = _MaskPredictor(dim, int(cfg["mask_feature_size"]))


class _Table(nn.Module):
    """An embedding table read whole (nn.Embedding's ``weight``, without its random init: the
    weights are loaded over it)."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))


class TransformerModule(nn.Module):
    """Queries -> (the last layer's normed query features (B, Q, D), its mask logits (B, Q, H/4, W/4))."""

    def __init__(self, cfg: dict):
        super().__init__()
        dim, queries = int(cfg["hidden_dim"]), int(cfg["num_queries"])
        self.heads = int(cfg["num_attention_heads"])
        project = int(cfg["feature_size"]) != dim or bool(cfg.get("enforce_input_projection"))
        self.input_projections = nn.ModuleList(
            nn.Conv2d(int(cfg["feature_size"]), dim, kernel_size=1) if project else nn.Sequential()
            for _ in range(LEVELS))
        self.queries_embedder = _Table(queries, dim)
        self.queries_features = _Table(queries, dim)
        self.level_embed = _Table(LEVELS, dim)
        self.decoder = _Decoder(cfg, dim)

    def forward(self, levels: list[torch.Tensor], pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory, mpos, sizes = [], [], []
        for i, x in enumerate(levels):
            sizes.append(tuple(x.shape[-2:]))
            mpos.append(sine_positions(x.shape, x.dtype, x.device, self.level_embed.weight.shape[1] // 2)
                        .flatten(2).transpose(1, 2))
            memory.append((self.input_projections[i](x).flatten(2) + self.level_embed.weight[i][None, :, None])
                          .transpose(1, 2))
        b = pixels.shape[0]
        dec = self.decoder
        x = self.queries_features.weight.unsqueeze(0).expand(b, -1, -1)
        qpos = self.queries_embedder.weight.unsqueeze(0).expand(b, -1, -1)
        # Each layer's cross-attention mask is the previous layer's mask logits resized to its level.
        # Resizing is linear and so is the mask head's last step (a dot product with the pixel
        # embeddings), so the logits are computed on the pixel embeddings resized to the three
        # levels, not at full size and then resized: ~4 of the forward's 78 GFLOP saved; only the
        # last layer's masks are computed at full size.
        small = [F.interpolate(pixels, size=size, mode="bilinear", align_corners=False) for size in sizes]
        normed = dec.layernorm(x)
        for i, layer in enumerate(dec.layers):
            allowed = self._allowed(dec.mask_predictor(normed, small[i % LEVELS]))
            x = layer(x, qpos, memory[i % LEVELS], mpos[i % LEVELS], allowed)
            normed = dec.layernorm(x)
        return normed, dec.mask_predictor(normed, pixels)

    def _allowed(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, heads, Q, h*w): where each query's cross-attention may look: its mask logits at the
        level, > 0.5 after the sigmoid; everywhere where that mask is empty."""
        m = masks.sigmoid().flatten(2) >= 0.5
        m = m | ~m.any(-1, keepdim=True)
        return m.unsqueeze(1).expand(-1, self.heads, -1, -1)
