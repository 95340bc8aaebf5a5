"""The ``diffusion-text`` task's model: a frozen prompt encoder and a denoiser that reads it by cross-attention.

* :class:`TextEncoder`: prompt token ids ``[N, L]`` → encodings ``[N, L, text_dim]`` and a
  validity mask ``[N, L]``. Seeded token and position embeddings, ``text_layers`` pre-norm
  transformer layers and a final LayerNorm, all initialised from ``text_seed`` and **frozen**
  (``requires_grad=False``: never trained, never a parameter group). It stands in for a
  pretrained text encoder (CLIP's in Stable Diffusion) the way a random one can: words are
  distinct directions, mixed a little with their context.
* :class:`CrossAttention`: image tokens ``[N, T, width]`` attend to the prompt encodings.
  Queries and the output projection are one ``nn.Linear`` each; keys and values are one
  ``nn.Linear(text_dim, head_dim)`` **per head** (``key.<h>``, ``value.<h>``), so every head's
  key and value projections are parameter groups of their own. A key/value projection's
  per-example gradient is ``Σ_j δ_j e_jᵀ`` over the prompt's tokens ``j`` with their frozen
  encodings ``e_j``: its input side is the words themselves, which is what lets gradients
  tell concepts apart without any parameter that belongs to one concept value.
* :class:`TextPatchMixer`: the ``diffusion`` task's patch mixer (4×4 patches, token- and
  channel-mixing blocks, FiLM) with FiLM from the **timestep only** and a cross-attention
  layer in every block; the prompt reaches the image through cross-attention alone. Its
  ``forward(images [N, 3, H, W], t [N], tokens [N, L]) -> ε̂ [N, 3, H, W]`` and
  ``null_tokens(n)`` (the empty prompt) fit :func:`~gradindex.tasks.diffusion_model.denoising_errors`
  and :func:`~gradindex.tasks.diffusion_model.sample` (guidance through the empty prompt).
  ``tokens`` may also be ``[N, 2, L]``: ids, then a 0/1 **gradient mask** — the keys and values
  of unmasked positions are used as computed but pass no gradient (``detach``), so a
  measurement's key/value gradients ``Σ_j δ_j e_jᵀ`` keep only the masked words' terms. The
  forward values are the same either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gradindex.errors import ConfigError
from gradindex.tasks.diffusion_model import DenoiserConfig, PatchIO
from gradindex.tasks.prompts import BOS, PAD


@dataclass(frozen=True)
class TextModelConfig(DenoiserConfig):
    vocab_size: int
    max_len: int
    heads: int = 4
    attn_dim: int = 48  # cross-attention inner width (heads × head dim)
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_seed: int = 0

    label: ClassVar[str] = "diffusion-text"
    positive: ClassVar[tuple[str, ...]] = ("vocab_size", "max_len", "heads", "attn_dim", "text_dim", "text_heads")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attn_dim % self.heads:
            raise ConfigError(f"diffusion-text model: heads {self.heads} do not divide attn_dim {self.attn_dim}")
        if self.text_dim % self.text_heads:
            raise ConfigError(f"diffusion-text model: text_heads {self.text_heads} do not divide text_dim "
                              f"{self.text_dim}")


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer (self-attention over valid tokens, then an MLP)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        y = self.norm1(h)
        h = h + self.attn(y, y, y, key_padding_mask=padding, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class TextEncoder(nn.Module):
    """Frozen prompt encoder: ``tokens [N, L]`` → ``(encodings [N, L, dim], valid [N, L])``.

    Every weight is drawn from ``seed`` at construction and frozen; token embeddings are
    N(0, 1) per entry, position embeddings N(0, 0.1²) (word identity dominates position).
    """

    def __init__(self, vocab_size: int, max_len: int, dim: int, layers: int, heads: int, seed: int):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.token = nn.Embedding(vocab_size, dim)
            self.position = nn.Embedding(max_len, dim)
            self.layers = nn.ModuleList([EncoderLayer(dim, heads) for _ in range(layers)])
            self.norm = nn.LayerNorm(dim)
        with torch.no_grad():
            self.position.weight.mul_(0.1)
        self.requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = tokens != PAD
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.token(tokens) + self.position(positions)[None]
        for layer in self.layers:
            h = layer(h, ~valid)
        return self.norm(h), valid


class CrossAttention(nn.Module):
    """Image tokens attend to prompt encodings; per-head key and value projections (see the module docstring)."""

    def __init__(self, width: int, text_dim: int, heads: int, attn_dim: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, attn_dim)
        self.key = nn.ModuleList([nn.Linear(text_dim, attn_dim // heads) for _ in range(heads)])
        self.value = nn.ModuleList([nn.Linear(text_dim, attn_dim // heads) for _ in range(heads)])
        self.out = nn.Linear(attn_dim, width)

    def forward(self, y: torch.Tensor, text: torch.Tensor, valid: torch.Tensor,
                through: torch.Tensor | None = None) -> torch.Tensor:
        """``y [N, T, width]``, ``text [N, L, text_dim]``, ``valid [N, L]``; ``through [N, L]`` (optional):
        the positions whose keys and values pass gradient (the others are detached)."""
        n, tokens, _ = y.shape
        q = self.query(y)
        head_dim = q.shape[-1] // self.heads
        q = q.reshape(n, tokens, self.heads, head_dim).transpose(1, 2)  # [N, H, T, d]
        k = torch.stack([key(text) for key in self.key], dim=1)  # [N, H, L, d]
        v = torch.stack([value(text) for value in self.value], dim=1)
        if through is not None:
            keep = through[:, None, :, None]
            k, v = torch.where(keep, k, k.detach()), torch.where(keep, v, v.detach())
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        # softmax over the few prompt tokens by hand: torch.softmax's per-row cost dominates at L ≈ 9
        mask = valid[:, None, None, :]
        scores = scores - scores.detach().masked_fill(~mask, float("-inf")).amax(-1, keepdim=True)
        weights = scores.exp() * mask
        mixed = (weights / weights.sum(-1, keepdim=True)) @ v  # [N, H, T, d]
        return self.out(mixed.transpose(1, 2).reshape(n, tokens, -1))


class TextBlock(nn.Module):
    """Token mixing, cross-attention to the prompt, channel mixing; each after a FiLM-modulated LayerNorm."""

    def __init__(self, config: TextModelConfig):
        super().__init__()
        c = config
        self.film = nn.Linear(c.cond_dim, 6 * c.width)
        self.token1 = nn.Linear(c.tokens, c.tokens * c.mlp_ratio)
        self.token2 = nn.Linear(c.tokens * c.mlp_ratio, c.tokens)
        self.cross = CrossAttention(c.width, c.text_dim, c.heads, c.attn_dim)
        self.chan1 = nn.Linear(c.width, c.width * c.mlp_ratio)
        self.chan2 = nn.Linear(c.width * c.mlp_ratio, c.width)

    def forward(self, h: torch.Tensor, cond: torch.Tensor, text: torch.Tensor, valid: torch.Tensor,
                through: torch.Tensor | None = None) -> torch.Tensor:
        scale1, shift1, scale2, shift2, scale3, shift3 = self.film(cond)[:, None, :].chunk(6, dim=-1)
        y = F.layer_norm(h, h.shape[-1:]) * (1 + scale1) + shift1
        h = h + self.token2(F.gelu(self.token1(y.transpose(1, 2)))).transpose(1, 2)
        y = F.layer_norm(h, h.shape[-1:]) * (1 + scale2) + shift2
        h = h + self.cross(y, text, valid, through)
        y = F.layer_norm(h, h.shape[-1:]) * (1 + scale3) + shift3
        return h + self.chan2(F.gelu(self.chan1(y)))


class TextPatchMixer(PatchIO, nn.Module):
    """ε-prediction network conditioned on a prompt through cross-attention; see the module docstring."""

    def __init__(self, config: TextModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = TextEncoder(c.vocab_size, c.max_len, c.text_dim, c.text_layers, c.text_heads, c.text_seed)
        self.time = nn.Linear(64, c.cond_dim)
        self.add_patch_layers(lambda: TextBlock(c))

    def null_tokens(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """``[n, max_len]`` empty prompts (``BOS`` alone): the unconditional input of guidance."""
        tokens = torch.full((n, self.config.max_len), PAD, dtype=torch.long, device=device)
        tokens[:, 0] = BOS
        return tokens

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        cond = self.time_embedding(t)
        through = None
        if tokens.ndim == 3:  # ids and a gradient mask
            tokens, through = tokens[:, 0], tokens[:, 1].bool()
        text, valid = self.encoder(tokens)
        h = self.embed_patches(x)
        for block in self.blocks:
            h = block(h, cond, text, valid, through)
        return self.unembed_patches(h, cond, x.shape)
