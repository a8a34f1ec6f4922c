"""KV cache for NSA models: the dense keys/values of :class:`transformers.DynamicLayer` plus, per batch
row, the compressed keys/values of every complete compression block.

Each row is one sequence made of the cached positions that are real tokens (padding excluded, so a
left-padded row starts at its first real token). The compressed state of a row is the output of the
layer's compressors over that sequence's complete blocks, in order. It is extended only when a new block
completes: past blocks are never recompressed.

Storage: ``cmp_k`` ``(B, Hkv, capacity, D)`` and ``cmp_v`` ``(B, Hkv, capacity, Dv)``, row ``b``'s
compressed token ``i`` at index ``i`` (so the decode kernels read them with ``cmp_start = 0``), plus the
per-row counts as a ``(B,)`` int32 tensor ``cmp_len`` (on the cache's device) and a host list
``cmp_counts``. The capacity grows geometrically (doubling), so a decoding step writes only its new
blocks and never copies the history. Slots at or beyond a row's count are scratch: they may hold
anything and are never read.

The attention backend (:mod:`.attention`) drives it in one of two ways:

* the varlen path (prefill, packed or irregular masks, CPU by default):
  ``counts = layer.compressed_counts(valid, cmp_block, cmp_stride)`` (``valid``: the ``(B, KV)`` mask
  of real tokens among the cached positions, after this step's keys were appended), compress blocks
  ``counts[b]`` up to ``num_cmp_blocks(valid[b].sum())`` of each row, then
  ``layer.append_compressed(valid, new_keys, new_values)``; ``layer.compressed_rows()`` gives the per-row
  ``(N_b, Hkv, D)`` views to pack;
* the decode path (Triton decode kernels, a few query tokens on a left-padded cache, see
  :func:`.attention.nsa_attention_forward`): ``layer.decode_ready(...)`` checks on the host that the
  stored state covers the previous positions, ``layer.write_compressed(slots, keys, values)`` stores the
  blocks completed by the new tokens at their slots, and ``layer.set_decode_state(...)`` records the new
  counts without a host sync.

Beam search, contrastive search and assisted decoding reorder, select, repeat or crop the cache; those
methods keep the compressed state in step with the dense one.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from nsa_kernels import num_cmp_blocks

_MIN_CAPACITY = 16


class NSACacheLayer(DynamicLayer):
    """A :class:`DynamicLayer` that also keeps each row's compressed keys/values.

    Attributes:
        cmp_k, cmp_v: ``(B, Hkv, capacity, D)`` / ``(B, Hkv, capacity, Dv)`` compressed keys/values (row
            ``b``'s block ``i`` at index ``i``), or ``None`` before the first NSA step.
        cmp_len: ``(B,)`` int32 tensor, compressed blocks stored per row (on the cache's device).
        cmp_counts: the same counts as a host list.
        valid: ``(B, KV)`` bool, which cached positions are real tokens (what the compressed state was
            built from), or ``None``.
        real_lens: host list, ``valid.sum(1)`` (real tokens per row), or ``None`` when unknown.
        left_aligned: ``valid`` is known to be padding followed by real tokens in every row (what
            ``generate()`` produces); the decode path then checks consistency on the host.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.clear_compressed()

    def clear_compressed(self) -> None:
        """Forget the compressed state (the next NSA step rebuilds it from the dense keys)."""
        self.cmp_k: torch.Tensor | None = None
        self.cmp_v: torch.Tensor | None = None
        self.cmp_len: torch.Tensor | None = None
        self.cmp_counts: list[int] | None = None
        self.valid: torch.Tensor | None = None
        self.real_lens: list[int] | None = None
        self.left_aligned = False
        self._aligned_valid: torch.Tensor | None = None  # the `valid` that left_aligned/real_lens describe
        self.cmp_block: int | None = None
        self.cmp_stride: int | None = None

    # -- storage --------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Compressed slots allocated per row (0 before the first NSA step)."""
        return 0 if self.cmp_k is None else self.cmp_k.shape[2]

    def ensure_capacity(self, needed: int, batch: int, heads: int, dim_k: int, dim_v: int, dtype, device) -> None:
        """Make room for ``needed`` compressed tokens per row, doubling the capacity when it grows (the
        stored blocks are copied once per doubling, not at every step)."""
        if self.cmp_k is not None and self.cmp_k.shape[2] >= needed:
            return
        new_cap = max(needed, 2 * self.capacity, _MIN_CAPACITY)
        new_k = torch.zeros(batch, heads, new_cap, dim_k, dtype=dtype, device=device)
        new_v = torch.zeros(batch, heads, new_cap, dim_v, dtype=dtype, device=device)
        if self.cmp_k is not None:
            old = self.cmp_k.shape[2]
            new_k[:, :, :old] = self.cmp_k
            new_v[:, :, :old] = self.cmp_v
        self.cmp_k, self.cmp_v = new_k, new_v

    def compressed_rows(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each row's stored compressed keys and values as ``(N_b, Hkv, D)`` views (packed layout)."""
        if self.cmp_k is None:
            return [], []
        keys = [self.cmp_k[b, :, :n].transpose(0, 1) for b, n in enumerate(self.cmp_counts)]
        values = [self.cmp_v[b, :, :n].transpose(0, 1) for b, n in enumerate(self.cmp_counts)]
        return keys, values

    @property
    def cmp_keys(self) -> list[torch.Tensor] | None:
        """Per-row ``(N_b, Hkv, D)`` compressed keys (views), or ``None`` before the first NSA step."""
        return None if self.cmp_k is None else self.compressed_rows()[0]

    @property
    def cmp_values(self) -> list[torch.Tensor] | None:
        """Per-row ``(N_b, Hkv, Dv)`` compressed values (views), or ``None`` before the first NSA step."""
        return None if self.cmp_k is None else self.compressed_rows()[1]

    # -- varlen path ----------------------------------------------------------------------------------

    def compressed_counts(self, valid: torch.Tensor, cmp_block: int, cmp_stride: int) -> list[int]:
        """Number of compressed blocks already stored for each row, given the ``(B, KV)`` mask ``valid``
        of the current cached positions. The stored state is kept only when it was built from a prefix
        of ``valid`` with the same block sizes; otherwise it is dropped and the counts are zero (the
        caller then compresses every block)."""
        batch = valid.shape[0]
        stored = self.valid
        consistent = (
            self.cmp_k is not None
            and stored is not None
            and self.cmp_k.shape[0] == batch
            and stored.shape[0] == batch
            and stored.shape[1] <= valid.shape[1]
            and (self.cmp_block, self.cmp_stride) == (cmp_block, cmp_stride)
            and bool(torch.equal(stored, valid[:, : stored.shape[1]]))
        )
        if not consistent:
            self.clear_compressed()
            self.cmp_block, self.cmp_stride = cmp_block, cmp_stride
            return [0] * batch
        return list(self.cmp_counts)

    def append_compressed(
        self, valid: torch.Tensor, new_keys: list[torch.Tensor], new_values: list[torch.Tensor],
        real_lens: list[int] | None = None, left_aligned: bool = False,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Append each row's newly completed compressed blocks ``(n_b, Hkv, D)`` and record ``valid`` as
        the positions they were built from (``real_lens``: its per-row sums, ``left_aligned``: see the
        class docstring). Returns the full per-row compressed keys and values (views)."""
        batch = len(new_keys)
        counts = list(self.cmp_counts) if self.cmp_k is not None else [0] * batch
        needed = max([c + k.shape[0] for c, k in zip(counts, new_keys)] + [1])
        ref_k, ref_v = new_keys[0], new_values[0]
        self.ensure_capacity(needed, batch, ref_k.shape[1], ref_k.shape[2], ref_v.shape[2], ref_k.dtype,
                             ref_k.device)
        for b, (nk, nv) in enumerate(zip(new_keys, new_values)):
            n = nk.shape[0]
            if n:
                self.cmp_k[b, :, counts[b]:counts[b] + n] = nk.transpose(0, 1)
                self.cmp_v[b, :, counts[b]:counts[b] + n] = nv.transpose(0, 1)
                counts[b] += n
        self._set_counts(counts)
        self.valid = valid
        self.real_lens = None if real_lens is None else list(real_lens)
        self.left_aligned, self._aligned_valid = left_aligned, valid
        return self.compressed_rows()

    def _set_counts(self, counts: list[int], device_counts: torch.Tensor | None = None) -> None:
        self.cmp_counts = list(counts)
        if device_counts is None:
            device_counts = torch.tensor(counts, dtype=torch.int32).to(self.cmp_k.device)
        self.cmp_len = device_counts

    def compressed_length(self) -> list[int]:
        """Compressed blocks stored per row (empty list before the first NSA step)."""
        return [] if self.cmp_k is None else list(self.cmp_counts)

    # -- decode path ----------------------------------------------------------------------------------

    def decode_ready(self, batch: int, past_len: int, past_real: list[int], cmp_block: int, cmp_stride: int,
                     valid: torch.Tensor) -> bool:
        """Whether the stored state was built from exactly the first ``past_len`` positions of
        ``valid`` (``(B, KV)``, left-aligned, ``past_real[b]`` real tokens among them). Host-only when
        the stored mask is known to be left-aligned; otherwise one comparison on the device."""
        if (
            self.cmp_k is None
            or self.valid is None
            or self.cmp_k.shape[0] != batch
            or self.valid.shape != (batch, past_len)
            or (self.cmp_block, self.cmp_stride) != (cmp_block, cmp_stride)
        ):
            return False
        if self.left_aligned and self.real_lens is not None and self._aligned_valid is self.valid:
            # Two left-aligned masks of the same length are equal iff their row sums are.
            return self.real_lens == list(past_real)
        return bool(torch.equal(self.valid, valid[:, :past_len]))

    def write_compressed(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        """Store ``keys``/``values`` ``(B, Hkv, J, D)`` at the per-row slots ``slots`` ``(B, J)`` (distinct
        within a row), after growing to at least ``capacity`` slots. Slots at or beyond a row's count
        are scratch, so candidates that did not complete may be written there."""
        batch, heads, _, dim_k = keys.shape
        self.ensure_capacity(capacity, batch, heads, dim_k, values.shape[-1], keys.dtype, keys.device)
        idx = slots[:, None, :, None]
        self.cmp_k.scatter_(2, idx.expand(-1, heads, -1, dim_k), keys)
        self.cmp_v.scatter_(2, idx.expand(-1, heads, -1, values.shape[-1]), values)

    def set_decode_state(self, valid: torch.Tensor, cmp_len: torch.Tensor, cmp_counts: list[int],
                         real_lens: list[int]) -> None:
        """Record the state after a decode step: ``valid`` (left-aligned), the per-row block counts (device
        tensor and host list, no copy between them) and real-token counts."""
        self.valid = valid
        self.cmp_len = cmp_len
        self.cmp_counts = list(cmp_counts)
        self.real_lens = list(real_lens)
        self.left_aligned, self._aligned_valid = True, valid

    # -- cache manipulations used by generate() -------------------------------------------------------

    def _select_rows(self, rows: list[int]) -> None:
        if self.cmp_k is not None:
            index = torch.tensor(rows, dtype=torch.long, device=self.cmp_k.device)
            self.cmp_k = self.cmp_k.index_select(0, index)
            self.cmp_v = self.cmp_v.index_select(0, index)
            self.cmp_len = self.cmp_len.index_select(0, index)
            self.cmp_counts = [self.cmp_counts[i] for i in rows]
            if self.real_lens is not None:
                self.real_lens = [self.real_lens[i] for i in rows]
        if self.valid is not None:
            tracked = self._aligned_valid is self.valid
            self.valid = self.valid[torch.tensor(rows, dtype=torch.long, device=self.valid.device)]
            self._aligned_valid = self.valid if tracked else None

    def reset(self) -> None:
        super().reset()
        self.clear_compressed()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_rows(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.cmp_k is not None:
            self._select_rows([i for i in range(self.cmp_k.shape[0]) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.cmp_k is not None:
            rows = torch.arange(self.cmp_k.shape[0])[torch.as_tensor(indices).cpu()].tolist()
            self._select_rows(rows)

    def crop(self, tokens_to_remove: int) -> None:
        """Crop the dense cache as :class:`DynamicLayer` does (any transformers version's convention),
        then drop the compressed blocks that are no longer complete."""
        super().crop(tokens_to_remove)
        if self.valid is None or self.cmp_k is None:
            return
        length = self.get_seq_length()
        tracked = self._aligned_valid is self.valid
        self.valid = self.valid[:, :length]
        self._aligned_valid = self.valid if tracked else None
        self.real_lens = self.valid.sum(dim=1).tolist()  # (a prefix of a left-aligned mask stays left-aligned)
        keep = [min(c, num_cmp_blocks(int(n), self.cmp_block, self.cmp_stride))
                for c, n in zip(self.cmp_counts, self.real_lens)]
        self._set_counts(keep)


class NSACache(DynamicCache):
    """A :class:`DynamicCache` whose layers are :class:`NSACacheLayer`.

    Args:
        ddp_cache_data: optional per-layer ``(keys, values)`` to start from, as for :class:`DynamicCache`
            (the compressed state is then built at the first NSA step).
        config: the model config; when given, one layer per hidden layer is created up front,
            otherwise layers are added as they are first updated.
        offloading: offload layers to CPU between uses (as in :class:`DynamicCache`).
    """

    def __init__(self, ddp_cache_data=None, config=None, offloading: bool = False,
                 offload_only_non_sliding: bool = False, **kwargs):
        layers = None
        if config is not None:
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
            layers = [NSACacheLayer() for _ in range(num_layers)]
        elif ddp_cache_data is not None:
            layers = [NSACacheLayer() for _ in ddp_cache_data]
        Cache.__init__(
            self,
            layers=layers,
            layer_class_to_replicate=None if layers is not None else NSACacheLayer,
            offloading=offloading,
            offload_only_non_sliding=offload_only_non_sliding,
        )
        for layer, data in zip(self.layers, ddp_cache_data or ()):
            keys, values = data[:2]
            if keys is not None and values is not None:
                layer.update(keys, values)


def nsa_cache_layer(past_key_values, layer_idx: int) -> NSACacheLayer | None:
    """The :class:`NSACacheLayer` of ``layer_idx`` in ``past_key_values``, or ``None`` when the cache is
    absent or of another kind (the backend then recompresses from the dense keys)."""
    layers = getattr(past_key_values, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    return layer if isinstance(layer, NSACacheLayer) else None
