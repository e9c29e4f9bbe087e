"""The Masked Autoencoder (He et al. 2021) in the original's named steps.

Shapes: B batch, C channels, H = W = img_size, p patch size, L = (H/p)^2 patches, K kept patches,
D encoder width, Dd decoder width. Weight names follow the original MAE / timm layout, so official
checkpoints load without renaming.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .core.bundle import no_decoder_error
from .core.config import MAEConfig
from .core.errors import MAEError
from .pos_embed import sincos_2d

PoolKind = Literal["cls", "mean", "cls+mean"]


class Masking(NamedTuple):
    ids_keep: torch.Tensor  # [B, K] int64, kept patch indices in shuffled order
    mask: torch.Tensor  # [B, L] float, 1 = removed, 0 = kept (in original patch order)
    ids_restore: torch.Tensor  # [B, L] int64, unshuffles the decoder sequence


class MAEOutput(NamedTuple):
    loss: torch.Tensor  # [] mean squared error on removed patches
    pred: torch.Tensor  # [B, L, p*p*C]
    mask: torch.Tensor  # [B, L]
    ids_restore: torch.Tensor  # [B, L]
    latent: torch.Tensor  # [B, 1+K, D]


def masking_from_noise(noise: torch.Tensor, mask_ratio: float) -> Masking:
    """The masking contract (identical to the original and to Hugging Face's `noise` argument).

    noise [B, L]: the K = int(L * (1 - mask_ratio)) patches with the smallest noise are kept.
    """
    batch, length = noise.shape
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # ascending: small is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(batch, length, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to patch order
    return Masking(ids_keep, mask, ids_restore)


def random_noise(
    batch: int, length: int, seed: int | None = None, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """[B, L] uniform noise from a seed (or a generator); feeds `masking_from_noise`."""
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, length, generator=generator).to(device or "cpu")


def monotone_noise(batch: int, length: int, device=None) -> torch.Tensor:
    """[B, L] arange noise: keeps patches in spatial order (unmasked feature extraction at mask 0)."""
    return torch.arange(length, dtype=torch.float32, device=device).expand(batch, length).contiguous()


def _activation(name: str) -> nn.Module:
    return {
        "gelu": nn.GELU(),
        "gelu_tanh": nn.GELU(approximate="tanh"),
        "relu": nn.ReLU(),
        "silu": nn.SiLU(),
    }[name]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, dim] -> [B, N, dim]
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, head_dim]
        x = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as timm
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = _activation(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm `Block` names: norm1, attn, norm2, mlp)."""

    def __init__(self, dim: int, num_heads: int, hidden: int, cfg: MAEConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(dim, num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, hidden, cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, L, D]
        return self.proj(x).flatten(2).transpose(1, 2)


class MaskedAutoencoder(nn.Module):
    """MAE with a ViT encoder and a light ViT decoder.

    `decoder=False` builds the encoder alone (for encoder-only weights such as `mae_pretrain_vit_base.pth`).
    """

    def __init__(self, cfg: MAEConfig, decoder: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.has_decoder = decoder
        length, dim, ddim = cfg.num_patches, cfg.embed_dim, cfg.decoder_embed_dim

        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + length, dim), requires_grad=False)  # fixed sin-cos
        self.blocks = nn.ModuleList([Block(dim, cfg.num_heads, cfg.encoder_hidden, cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)

        if decoder:
            self.decoder_embed = nn.Linear(dim, ddim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + length, ddim), requires_grad=False)
            self.decoder_blocks = nn.ModuleList(
                [Block(ddim, cfg.decoder_num_heads, cfg.decoder_hidden, cfg) for _ in range(cfg.decoder_depth)]
            )
            self.decoder_norm = nn.LayerNorm(ddim, eps=cfg.layer_norm_eps)
            self.decoder_pred = nn.Linear(ddim, cfg.patch_dim)
        self.initialize_weights()

    # ----------------------------------------------------------------------------------------- init
    def initialize_weights(self) -> None:
        """As the original: sin-cos position embeddings, xavier-uniform linears, N(0, .02) tokens."""
        cfg = self.cfg
        self.pos_embed.data.copy_(torch.from_numpy(sincos_2d(cfg.embed_dim, cfg.grid_size)).unsqueeze(0))
        weight = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))  # like a Linear on flattened patches
        nn.init.normal_(self.cls_token, std=0.02)
        if self.has_decoder:
            table = sincos_2d(cfg.decoder_embed_dim, cfg.grid_size)
            self.decoder_pos_embed.data.copy_(torch.from_numpy(table).unsqueeze(0))
            nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # -------------------------------------------------------------------------------------- patches
    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L, p*p*C], each patch ordered (row, col, channel) as the original."""
        return patchify(images, self.cfg.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """[B, L, p*p*C] -> [B, C, H, W]."""
        return unpatchify(patches, self.cfg.patch_size, self.cfg.in_chans)

    def masking(
        self,
        batch: int,
        mask_ratio: float | None = None,
        noise: torch.Tensor | np.ndarray | None = None,
        seed: int | None = None,
        device=None,
    ) -> Masking:
        """Masking from a noise array, or from a seed (random), per the contract."""
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        if noise is None:
            noise = random_noise(batch, self.cfg.num_patches, seed=seed)
        noise = torch.as_tensor(noise, dtype=torch.float32)
        if noise.shape != (batch, self.cfg.num_patches):
            raise MAEError(
                f"noise has shape {tuple(noise.shape)}, expected [{batch}, {self.cfg.num_patches}] "
                "(one row per image, one value per patch)"
            )
        return masking_from_noise(noise.to(device or self.cls_token.device), ratio)

    # -------------------------------------------------------------------------------------- encoder
    def forward_encoder(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W], ids_keep [B, K] -> latent [B, 1+K, D] (after the final norm)."""
        x = self.patch_embed(images)  # [B, L, D]
        x = x + self.pos_embed[:, 1:, :]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, K, D]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1)  # [B, 1+K, D]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    # -------------------------------------------------------------------------------------- decoder
    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1+K, D], ids_restore [B, L] -> pred [B, L, p*p*C] (normalized pixels if norm_pix_loss)."""
        if not self.has_decoder:
            raise no_decoder_error("These weights")
        x = self.decoder_embed(latent)  # [B, 1+K, Dd]
        batch, length = ids_restore.shape
        # Append L mask tokens (not L-K): ids_restore only indexes [0, L), so the surplus is never gathered.
        # This keeps the ONNX graph free of shape arithmetic; values equal the original's.
        mask_tokens = self.mask_token.expand(batch, length, -1)  # [B, L, Dd]
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [B, K+L, Dd]
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, L, Dd]
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed  # [B, 1+L, Dd]
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))  # [B, 1+L, p*p*C]
        return x[:, 1:, :]

    # ----------------------------------------------------------------------------------------- loss
    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over removed patches only."""
        target = self.patchify(images)  # [B, L, p*p*C]
        if self.cfg.norm_pix_loss:
            target = normalize_patches(target)
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [B, L]
        return (loss * mask).sum() / mask.sum()

    def forward(
        self,
        images: torch.Tensor,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
        ids_keep: torch.Tensor | None = None,
    ) -> MAEOutput:
        """Full MAE pass. Masking comes from `noise` (or fresh random noise); `ids_keep` is not enough
        to reconstruct (the decoder needs ids_restore), so it is turned into equivalent noise."""
        batch = images.shape[0]
        if ids_keep is not None:
            noise = noise_from_ids_keep(ids_keep, self.cfg.num_patches)
            mask_ratio = 1 - ids_keep.shape[1] / self.cfg.num_patches
        if noise is None:
            noise = torch.rand(batch, self.cfg.num_patches, device=images.device)
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        masking = masking_from_noise(noise.to(images.device), ratio)
        latent = self.forward_encoder(images, masking.ids_keep)
        pred = self.forward_decoder(latent, masking.ids_restore)
        loss = self.forward_loss(images, pred, masking.mask)
        return MAEOutput(loss, pred, masking.mask, masking.ids_restore, latent)

    # ------------------------------------------------------------------------------------- features
    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unmasked tokens: images [B, C, H, W] -> [B, 1+L, D], patches in spatial order."""
        ids_keep = torch.arange(self.cfg.num_patches, device=images.device).expand(images.shape[0], -1)
        return self.forward_encoder(images, ids_keep)

    @staticmethod
    def pool(tokens: torch.Tensor, kind: PoolKind = "cls") -> torch.Tensor:
        """[B, 1+N, D] -> [B, D] ("cls", "mean" over patch tokens) or [B, 2D] ("cls+mean")."""
        return pool(tokens, kind)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C] with (row, col, channel) order inside each patch."""
    batch, chans, height, width = images.shape
    p = patch_size
    x = images.reshape(batch, chans, height // p, p, width // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(batch, (height // p) * (width // p), p * p * chans)


def unpatchify(patches: torch.Tensor, patch_size: int, chans: int = 3) -> torch.Tensor:
    """[B, L, p*p*C] -> [B, C, H, W]."""
    batch, length, _ = patches.shape
    grid = int(round(length**0.5))
    p = patch_size
    x = patches.reshape(batch, grid, grid, p, p, chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(batch, chans, grid * p, grid * p)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalization of `norm_pix_loss`: unbiased variance, eps 1e-6, as the original."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)  # unbiased
    return (patches - mean) / (var + eps) ** 0.5


def noise_from_ids_keep(ids_keep: torch.Tensor, length: int) -> torch.Tensor:
    """Noise whose masking keeps exactly `ids_keep` in that order; removed patches follow in spatial order."""
    batch, keep = ids_keep.shape
    noise = torch.arange(length, dtype=torch.float32, device=ids_keep.device).expand(batch, length) + length
    rank = torch.arange(keep, dtype=torch.float32, device=ids_keep.device).expand(batch, keep)
    return noise.clone().scatter_(1, ids_keep, rank)


def pool(tokens: torch.Tensor, kind: PoolKind = "cls") -> torch.Tensor:
    """[B, 1+L, D] -> [B, D] (cls; mean of the patch tokens) or [B, 2D] (cls+mean), as the runtime's numpy
    `mae.core.numerics.pool_tokens`."""
    pieces = {"cls": ("cls",), "mean": ("mean",), "cls+mean": ("cls", "mean")}.get(kind)
    if pieces is None:
        raise MAEError(f"Unknown pooling {kind!r}", hint="use cls, mean or cls+mean")
    pooled = {"cls": lambda: tokens[:, 0], "mean": lambda: tokens[:, 1:].mean(dim=1)}
    return torch.cat([pooled[piece]() for piece in pieces], dim=-1)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
