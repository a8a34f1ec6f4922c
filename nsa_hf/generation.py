"""Greedy decoding on a static cache, optionally replayed from a CUDA graph.

At batch 1 on a long context, a decoding step of a ~1B model is bound by host work (Python, kernel
launches, ``generate()``'s per-step bookkeeping), not by the GPU: the attention kernels' savings only show
when the step's launches are replayed from a CUDA graph. :class:`StaticGreedyDecoder` prefills a prompt
into an :class:`~.cache.NSAStaticCache` (a plain :class:`~transformers.StaticCache` for other models, so
that dense baselines run the same loop), then runs decoding steps whose tensors all have fixed shapes
and addresses: one step (embedding, layers, LM head, argmax, next inputs) is captured once and replayed
for every further token, with no host synchronisation until the tokens are read.

With NSA-Llama the captured step takes the static decode path of :mod:`.decoding` (decode kernels,
candidate-block compression, no host work), which needs the Triton decode kernels (CUDA, or
``nsa_backend(decode="triton")``) and left-padded prompts.

``model.generate()`` of an NSA model does the same on CUDA by default, for every decoding strategy: a static
NSA cache, with decoding steps compiled by transformers (``docs/generation.md``). This module remains as
the greedy-only loop with a plain CUDA graph and no ``torch.compile``.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import StaticCache

from .backends import decode_enabled
from .cache import NSAStaticCache, NSAStaticCacheLayer, cache_kwarg
from .families import NSA_MODEL_TYPES

__all__ = ["StaticGreedyDecoder", "static_greedy_generate"]


def _left_aligned_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, prompt_length) with a non-empty prompt; got {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.long)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
        )
    mask = attention_mask.to(torch.long)
    real = mask.sum(1)
    aligned = bool((mask[:, 1:] >= mask[:, :-1]).all()) and int(real.min()) > 0
    if not aligned:
        raise ValueError(
            "static decoding needs left-padded prompts (padding, then at least one real token, in every row); "
            "use tokenizer.padding_side = 'left'"
        )
    return mask


class StaticGreedyDecoder:
    """Greedy decoding of ``model`` with a static cache of ``max_cache_len`` positions.

    Args:
        model: a causal LM (NSA-Llama gets an :class:`NSAStaticCache`, others a :class:`StaticCache`).
        max_cache_len: prompt length (padding included) plus the new tokens to generate.
        cuda_graph: capture one decoding step and replay it (default: when the model is on CUDA).
        warmup_steps: eager decoding steps before the capture (they produce real tokens; Triton compiles
            and cuBLAS initialises there, outside the graph).

    Use :meth:`prefill` once, then :meth:`decode`; :func:`static_greedy_generate` does both.
    """

    def __init__(self, model, max_cache_len: int, cuda_graph: bool | None = None, warmup_steps: int = 2):
        if int(max_cache_len) <= 0:
            raise ValueError(f"max_cache_len must be positive; got {max_cache_len}")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1 (one eager step before a capture); got {warmup_steps}")
        self.model = model
        self.max_cache_len = int(max_cache_len)
        self.cuda_graph = cuda_graph
        self.warmup_steps = warmup_steps
        self.nsa = getattr(model.config, "model_type", None) in NSA_MODEL_TYPES.values()
        self.cache = None
        self.graph: torch.cuda.CUDAGraph | None = None

    # -- the one step -------------------------------------------------------------------------------------

    def _step(self) -> torch.Tensor:
        """Decode one token per row from the static inputs and advance them in place."""
        batch = self.tok.shape[0]
        self.mask.scatter_(1, self.cur.view(1, 1).expand(batch, 1), 1)  # the new position is a real token
        out = self.model(
            input_ids=self.tok, attention_mask=self.mask, position_ids=self.pos,
            use_cache=True, **{cache_kwarg(self.model): self.cache},
        )
        nxt = out.logits[:, -1].argmax(-1)
        self.tok.copy_(nxt[:, None])
        self.pos.add_(1)
        self.cur.add_(1)
        return nxt

    # -- public API -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt (left-padded, ``(B, P)``) into a fresh static cache; returns the first new token
        of every row ``(B,)``."""
        mask = _left_aligned_mask(input_ids, attention_mask)
        batch, plen = input_ids.shape
        if plen >= self.max_cache_len:
            raise ValueError(f"prompt length {plen} leaves no room in max_cache_len={self.max_cache_len}")
        cache_cls = NSAStaticCache if self.nsa else StaticCache
        self.cache = cache_cls(config=self.model.config, max_cache_len=self.max_cache_len)
        self.graph = None
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, **{cache_kwarg(self.model): self.cache})
        first = out.logits[:, -1].argmax(-1)
        device = input_ids.device
        self.mask = torch.zeros(batch, self.max_cache_len, dtype=torch.long, device=device)
        self.mask[:, :plen] = mask
        self.tok = first[:, None].clone()
        self.pos = position_ids[:, -1:] + 1
        self.cur = torch.full((1,), plen, dtype=torch.long, device=device)
        self.written = plen
        self.eager_steps = 0
        return first

    def _check_graph_ready(self) -> None:
        if not self.nsa:
            return
        layers = [layer for layer in self.cache.layers if isinstance(layer, NSAStaticCacheLayer)]
        if not all(layer.static_ready for layer in layers):
            raise ValueError("the NSA static cache is not ready for graph-safe decoding after the prefill (rows "
                             "must be left-padded single sequences); use cuda_graph=False")
        if not decode_enabled(self.model.config, self.tok.device):
            raise ValueError("CUDA-graph decoding of NSA needs the Triton decode kernels: run on CUDA with the "
                             "decode backend 'auto' or 'triton' (nsa_hf.nsa_backend(decode=...), "
                             "config.nsa_decode_backend), or use cuda_graph=False")

    @torch.no_grad()
    def decode(self, steps: int) -> torch.Tensor:
        """``steps`` further greedy tokens per row ``(B, steps)``, after :meth:`prefill` (or a previous
        :meth:`decode`)."""
        if self.cache is None:
            raise ValueError("call prefill() before decode()")
        if steps < 0 or self.written + steps > self.max_cache_len:
            raise ValueError(
                f"steps={steps} must be >= 0 and fit the cache: {self.written} of {self.max_cache_len} positions used"
            )
        use_graph = self.tok.is_cuda if self.cuda_graph is None else self.cuda_graph
        if use_graph and not self.tok.is_cuda:
            raise ValueError("cuda_graph=True needs the model and inputs on a CUDA device")
        tokens = []
        for _ in range(steps):
            if not use_graph:
                tokens.append(self._step().clone())
            elif self.graph is None and self.eager_steps < self.warmup_steps:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    tokens.append(self._step().clone())
                torch.cuda.current_stream().wait_stream(stream)
                self.eager_steps += 1
            else:
                if self.graph is None:
                    self._check_graph_ready()
                    self.graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(self.graph):
                        self.graph_out = self._step()
                self.graph.replay()
                tokens.append(self.graph_out.clone())
            self.written += 1
        if not tokens:
            return self.tok.new_zeros(self.tok.shape[0], 0)
        return torch.stack(tokens, dim=1)


def static_greedy_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           max_new_tokens: int = 32, cuda_graph: bool | None = None) -> torch.LongTensor:
    """Greedy decoding with a static cache (and, on CUDA, CUDA-graph replay of the decoding step).

    Returns ``(B, P + max_new_tokens)``: the prompt followed by the new tokens, like ``generate()`` with
    ``do_sample=False`` (no early stop at EOS: every row gets ``max_new_tokens`` tokens). Prompts must be
    left-padded."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    decoder = StaticGreedyDecoder(model, input_ids.shape[1] + max_new_tokens, cuda_graph=cuda_graph)
    first = decoder.prefill(input_ids, attention_mask)
    rest = decoder.decode(max_new_tokens - 1)
    return torch.cat([input_ids, first[:, None], rest], dim=1)
