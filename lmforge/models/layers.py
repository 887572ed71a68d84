"""Building blocks shared by lmforge's transformer models: linear layers and embeddings with Hugging
Face's initialisation, norms, rotary positions, causal self-attention and the two MLP flavours.

Every module here has ``reset_parameters()`` that initialises it exactly as transformers'
``_init_weights`` does for the same layer (the same distributions; random streams are lmforge's own), so
a model built on the meta device, materialised with ``to_empty`` and reset equals an eager build.
Modules without parameters of their own (attention, MLPs, blocks) reset their children in order via
:func:`reset_children`; a child that has ``reset_parameters()`` owns the initialisation of its whole
subtree (so a delta-method wrapper can decide how its inner modules start).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.cache import KVCache

# ``enable_gqa`` (grouped-query attention without materialised repeats) arrived in torch 2.5.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def need(cond: bool, msg: str) -> None:
    """A model config's check in ``__post_init__``: ValueError(msg) unless ``cond`` (``core.config`` reports it as
    a one-line ConfigError)."""
    if not cond:
        raise ValueError(msg)


def reset_children(module: nn.Module) -> None:
    """Call ``reset_parameters()`` on each child in registration order, descending into children that
    have none (containers such as ``nn.ModuleList``)."""
    for child in module.children():
        reset = getattr(child, "reset_parameters", None)
        if callable(reset):
            reset()
        else:
            reset_children(child)


class Linear(nn.Linear):
    """``nn.Linear`` initialised as transformers does: weight ~ N(0, std), bias = 0.

    ``std`` is kept on the module (GPT-2's residual projections use a depth-scaled one).  It is a
    subclass of ``nn.Linear``, so code that looks for ``nn.Linear`` (delta methods, FSDP) finds it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, std: float = 0.02,
                 device=None, dtype=None) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: its kaiming init would draw random numbers
        self.in_features = in_features
        self.out_features = out_features
        self.std = std
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, std={self.std:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inference mode only (generation, serving): under plain training or no_grad the usual product keeps
        # results bitwise independent of the grad mode.
        if x.device.type == "cpu" and x.numel() <= _FEW_ROWS * self.in_features and torch.is_inference_mode_enabled():
            return few_rows_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


# Linear's few-row path (see few_rows_linear) applies up to this many rows: decoding steps and short scoring
# calls.  Measured on a 2-core EPYC (torch 2.13 CPU, MKL) for the shapes of a 6x384 GPT-2 with weights
# streamed from DRAM: at 2-64 rows ``W @ x^T`` takes 0.4-0.7x the time of ``F.linear``; at 256 rows they tie.
_FEW_ROWS = 64


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a few rows on CPU, computed as ``(weight @ x^T)^T`` (no autograd).

    Why: a decoding step multiplies a handful of rows by every weight matrix, and is bound by streaming the
    weights from memory.  BLAS streams an ``[out, in]`` matrix faster when it is the *left* operand of the
    product (``[out, in] @ [in, rows]``) than as the transposed right operand ``F.linear`` makes of it.  One
    row: with one intra-op thread BLAS's matrix-vector product is the fastest; with more, its matrix-vector path
    is slower than the matrix product of two rows, so the row is computed twice.  (Measured on a 2-core EPYC,
    torch 2.13 CPU, weights streamed from DRAM.)  Same values as ``F.linear`` up to float summation order; the
    stored weight is used as it is (no copy).
    """
    rows = x.numel() // weight.shape[1]
    x2 = x.reshape(rows, weight.shape[1])
    if rows == 1 and torch.get_num_threads() == 1:
        y = torch.mv(weight, x2[0]) if bias is None else torch.addmv(bias, weight, x2[0])
        return y.view(*x.shape[:-1], weight.shape[0])
    if rows == 1:
        x2 = torch.cat((x2, x2))
    yt = torch.mm(weight, x2.t()) if bias is None else torch.addmm(bias[:, None], weight, x2.t())
    return yt[:, :rows].t().contiguous().view(*x.shape[:-1], weight.shape[0])


class Embedding(nn.Embedding):
    """``nn.Embedding`` initialised as transformers does: N(0, std), the padding row (if any) zero."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *,
                 std: float = 0.02, device=None, dtype=None) -> None:
        self.std = std  # read by reset_parameters(), which nn.Embedding.__init__ calls
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].zero_()


# nn.LayerNorm and nn.RMSNorm already reset to weight = 1 (and bias = 0), as transformers does.
LayerNorm = nn.LayerNorm
RMSNorm = nn.RMSNorm


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE), Hugging Face's rotate-half convention.

    Holds no state: the inverse frequencies are recomputed in fp32 on each call (``head_dim / 2``
    numbers), so there is no buffer to lose on the meta device or to round when the model is cast to
    bf16.  Returns ``cos, sin`` of shape ``[B or 1, 1, T, head_dim]`` ready to broadcast over heads.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta

    def reset_parameters(self) -> None:  # nothing to initialise
        pass

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta ** exponents)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta:g}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x``: ``[B, H, T, D]``; ``cos, sin``: ``[B or 1, 1, T, D]``."""
    return x * cos + rotate_half(x) * sin


class RealTokens:
    """The real (non-pad) tokens of a padded ``[B, T]`` batch, for the layers that work token by token.

    Projections, MLPs, norms and residual adds do not mix positions, so they can run on the ``[N, d]`` real tokens
    alone (N = the mask's sum) and skip the padding's share of the matmuls — 40% of an SFT batch's cells are
    padding (benchmarks/RESULTS.md).  Only attention needs the ``[B, T]`` grid: :meth:`scatter` before it (zeros at
    padding, which the mask hides), :meth:`gather` after.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        self.B, self.T = mask.shape
        self.index = mask.reshape(-1).nonzero().squeeze(1)  # [N] positions in the flattened grid

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, C]`` -> ``[N, C]``."""
        return x.reshape(self.B * self.T, x.shape[-1]).index_select(0, self.index)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` -> ``[B, T, C]``, zeros at padding."""
        grid = x.new_zeros(self.B * self.T, x.shape[-1])
        return grid.index_copy(0, self.index, x).view(self.B, self.T, x.shape[-1])


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``.

    ``fused=True`` is GPT-2's layout: one ``c_attn`` Linear producing ``[q | k | v]`` (split with views)
    and ``c_proj``.  ``fused=False`` is Llama's: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, with
    grouped-query attention when ``n_kv_head < n_head`` and rotary positions applied to q and k.
    """

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, *, layer_idx: int, fused: bool,
                 qkv_bias: bool, out_bias: bool, dropout: float = 0.0, std: float = 0.02,
                 out_std: float | None = None) -> None:
        super().__init__()
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.head_dim = d_model // n_head
        self.layer_idx = layer_idx
        self.fused = fused
        self.dropout = dropout
        out_std = std if out_std is None else out_std
        if fused:
            if n_kv_head != n_head:
                raise ValueError("the fused (GPT-2) attention layout has no grouped-query variant")
            self.c_attn = Linear(d_model, 3 * d_model, bias=qkv_bias, std=std)
            self.c_proj = Linear(d_model, d_model, bias=out_bias, std=out_std)
        else:
            kv_dim = n_kv_head * self.head_dim
            self.q_proj = Linear(d_model, d_model, bias=qkv_bias, std=std)
            self.k_proj = Linear(d_model, kv_dim, bias=qkv_bias, std=std)
            self.v_proj = Linear(d_model, kv_dim, bias=qkv_bias, std=std)
            self.o_proj = Linear(d_model, d_model, bias=out_bias, std=out_std)

    def reset_parameters(self) -> None:
        reset_children(self)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                attn_mask: torch.Tensor | None, is_causal: bool, cache: KVCache | None = None,
                tokens: RealTokens | None = None) -> torch.Tensor:
        """``x [B, T, d]``, or ``[N, d]`` real tokens with ``tokens`` (projections on those alone; the grid for
        SDPA only); returns the same layout."""
        grid = tokens.scatter if tokens is not None else (lambda t: t)
        B, T = (tokens.B, tokens.T) if tokens is not None else x.shape[:2]
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        if self.fused:
            # [B, T, 3d] -> three [B, H, T, D] views, no copies.
            q, k, v = grid(self.c_attn(x)).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = grid(self.q_proj(x)).view(B, T, H, D).transpose(1, 2)
            k = grid(self.k_proj(x)).view(B, T, Hkv, D).transpose(1, 2)
            v = grid(self.v_proj(x)).view(B, T, Hkv, D).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        gqa = Hkv != H
        if gqa and not _SDPA_HAS_GQA:  # torch < 2.5
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
            gqa = False
        kwargs = {"enable_gqa": True} if gqa else {}
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, **kwargs)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        if tokens is not None:
            y = tokens.gather(y)
        return self.c_proj(y) if self.fused else self.o_proj(y)


class GeluMLP(nn.Module):
    """GPT-2's MLP: ``c_proj(gelu_tanh(c_fc(x)))`` (transformers' ``gelu_new``)."""

    def __init__(self, d_model: int, d_ff: int, *, bias: bool = True, std: float = 0.02,
                 out_std: float | None = None) -> None:
        super().__init__()
        self.c_fc = Linear(d_model, d_ff, bias=bias, std=std)
        self.c_proj = Linear(d_ff, d_model, bias=bias, std=std if out_std is None else out_std)

    def reset_parameters(self) -> None:
        reset_children(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class SwiGLUMLP(nn.Module):
    """Llama's MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, d_model: int, d_ff: int, *, bias: bool = False, std: float = 0.02) -> None:
        super().__init__()
        self.gate_proj = Linear(d_model, d_ff, bias=bias, std=std)
        self.up_proj = Linear(d_model, d_ff, bias=bias, std=std)
        self.down_proj = Linear(d_ff, d_model, bias=bias, std=std)

    def reset_parameters(self) -> None:
        reset_children(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def gpt2_residual_std(initializer_range: float, n_layer: int) -> float:
    """GPT-2's scaled init of the residual projections (both ``c_proj``): std / sqrt(2 * n_layer)."""
    return initializer_range / math.sqrt(2 * n_layer)
