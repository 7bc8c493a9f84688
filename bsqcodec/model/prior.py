"""Autoregressive transformer prior over token grids (float; for training and for export).

A tile of tokens is read in raster order. Position t sees the tokens before it: its input is the
embedding of token t-1 (a learned start vector at t = 0) plus row and column embeddings of t.
A token of L bits is coded as `groups` symbols; group j is predicted from the transformer output
plus embeddings of the groups before it in the same token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PriorConfig
from .tokenizer import split_groups


class Attention(nn.Module):
    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim)
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Prior(nn.Module):
    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, G, n = cfg.dim, cfg.groups, 2**cfg.group_bits
        self.tok_emb = nn.Embedding(G * n, D)  # token embedding = sum of its groups' embeddings
        self.start = nn.Parameter(torch.zeros(D))
        self.row_emb = nn.Embedding(cfg.tile_rows, D)
        self.col_emb = nn.Embedding(cfg.tile_cols, D)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.layers)])
        self.cond_emb = nn.Embedding(max(1, (G - 1) * n), D)  # earlier groups of the same token
        self.head_ln = nn.ModuleList([nn.LayerNorm(D) for _ in range(G)])
        self.heads = nn.ModuleList([nn.Linear(D, n) for _ in range(G)])
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def positions(self, rows: int, cols: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(rows * cols, device=device)
        return t // cols, t % cols

    def symbols(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, r, c) tokens -> (B, T, G) symbols in raster order."""
        B = tokens.shape[0]
        return split_groups(tokens.reshape(B, -1), self.cfg.bits, self.cfg.groups)

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """(B, r, c) tokens -> list over groups of (B, T, 2^g) logits, teacher-forced."""
        B, r, c = tokens.shape
        return self.logits(self.symbols(tokens), r, c)

    @torch.no_grad()
    def tables(self, sym: torch.Tensor, rows: int, cols: int) -> list[torch.Tensor]:
        """As IntPrior.tables, in float: sym (B, T, G) of tiles rows x cols -> list over groups of (B, T, 2^g)
        probabilities. For estimates only (the search's bit costs); files are coded with IntPrior's tables."""
        return [torch.softmax(lg, -1) for lg in self.logits(sym, rows, cols)]

    def logits(self, sym: torch.Tensor, r: int, c: int) -> list[torch.Tensor]:
        """(B, T, G) symbols of r x c tiles in raster order -> list over groups of (B, T, 2^g) logits."""
        B = sym.shape[0]
        n = 2**self.cfg.group_bits
        offs = torch.arange(self.cfg.groups, device=sym.device) * n
        emb = self.tok_emb(sym + offs).sum(2)  # (B, T, D)
        x = torch.cat([self.start.expand(B, 1, -1), emb[:, :-1]], 1)
        rr, cc = self.positions(r, c, sym.device)
        x = x + self.row_emb(rr) + self.col_emb(cc)
        for blk in self.blocks:
            x = blk(x)
        out = []
        z = x
        for j in range(self.cfg.groups):
            if j > 0:
                z = z + self.cond_emb(sym[..., j - 1] + (j - 1) * n)
            out.append(self.heads[j](self.head_ln[j](z)))
        return out

    def loss(self, tokens: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        """Mean cross-entropy in nats per symbol. `module` may be a DDP wrapper of self."""
        logits = (module or self)(tokens)
        sym = self.symbols(tokens)
        n = 2**self.cfg.group_bits
        return sum(F.cross_entropy(l.reshape(-1, n), sym[..., j].reshape(-1)) for j, l in enumerate(logits)) / len(logits)

    def bits(self, tokens: torch.Tensor) -> float:
        """Total -log2 p of the tokens under the float prior."""
        with torch.no_grad():
            logits = self(tokens)
            sym = self.symbols(tokens)
            tot = 0.0
            for j, l in enumerate(logits):
                lp = F.log_softmax(l.double(), -1).gather(-1, sym[..., j : j + 1])
                tot -= lp.sum().item() / math.log(2)
            return tot
