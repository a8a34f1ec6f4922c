"""KV cache for NSA models: the dense keys/values of :class:`transformers.DynamicLayer` plus, per batch
row, the compressed keys/values of every complete compression block.

Each row is one sequence made of the cached positions that are real tokens (padding excluded, so a
left-padded row starts at its first real token). The compressed state of a row is the output of the
layer's compressors over that sequence's complete blocks, in order. It is extended only when a new block
completes: past blocks are never recompressed. The attention backend (:mod:`.attention`) drives it:

1. ``counts = layer.compressed_counts(valid, cmp_block, cmp_stride)`` with ``valid`` the ``(B, KV)``
   mask of real tokens among the cached positions (after this step's keys were appended);
2. it compresses blocks ``counts[b]`` up to ``num_cmp_blocks(valid[b].sum())`` of each row;
3. ``layer.append_compressed(valid, new_keys, new_values)`` stores them.

Beam search, contrastive search and assisted decoding reorder, select, repeat or crop the cache; those
methods keep the compressed state in step with the dense one.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from nsa_kernels import num_cmp_blocks


class NSACacheLayer(DynamicLayer):
    """A :class:`DynamicLayer` that also keeps each row's compressed keys/values.

    Attributes:
        cmp_keys, cmp_values: per row, ``(N_cmp_b, Hkv, D)`` compressed keys/values (or ``None`` before
            the first NSA step).
        valid: ``(B, KV)`` bool, which cached positions are real tokens (what the compressed state was
            built from), or ``None``.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.clear_compressed()

    def clear_compressed(self) -> None:
        """Forget the compressed state (the next NSA step rebuilds it from the dense keys)."""
        self.cmp_keys: list[torch.Tensor] | None = None
        self.cmp_values: list[torch.Tensor] | None = None
        self.valid: torch.Tensor | None = None
        self.cmp_block: int | None = None
        self.cmp_stride: int | None = None

    # -- driven by the attention backend -------------------------------------------------------------

    def compressed_counts(self, valid: torch.Tensor, cmp_block: int, cmp_stride: int) -> list[int]:
        """Number of compressed blocks already stored for each row, given the ``(B, KV)`` mask ``valid``
        of the current cached positions. The stored state is kept only when it was built from a prefix
        of ``valid`` with the same block sizes; otherwise it is dropped and the counts are zero (the
        caller then compresses every block)."""
        batch = valid.shape[0]
        stored = self.valid
        consistent = (
            self.cmp_keys is not None
            and stored is not None
            and len(self.cmp_keys) == batch
            and stored.shape[0] == batch
            and stored.shape[1] <= valid.shape[1]
            and (self.cmp_block, self.cmp_stride) == (cmp_block, cmp_stride)
            and bool(torch.equal(stored, valid[:, : stored.shape[1]]))
        )
        if not consistent:
            self.clear_compressed()
            self.cmp_block, self.cmp_stride = cmp_block, cmp_stride
            return [0] * batch
        return [k.shape[0] for k in self.cmp_keys]

    def append_compressed(
        self, valid: torch.Tensor, new_keys: list[torch.Tensor], new_values: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Append each row's newly completed compressed blocks and record ``valid`` as the positions
        they were built from. Returns the full per-row compressed keys and values."""
        if self.cmp_keys is None:
            self.cmp_keys, self.cmp_values = list(new_keys), list(new_values)
        else:
            self.cmp_keys = [torch.cat([old, new], dim=0) if new.shape[0] else old
                             for old, new in zip(self.cmp_keys, new_keys)]
            self.cmp_values = [torch.cat([old, new], dim=0) if new.shape[0] else old
                               for old, new in zip(self.cmp_values, new_values)]
        self.valid = valid
        return self.cmp_keys, self.cmp_values

    def compressed_length(self) -> list[int]:
        """Compressed blocks stored per row (empty list before the first NSA step)."""
        return [] if self.cmp_keys is None else [k.shape[0] for k in self.cmp_keys]

    # -- cache manipulations used by generate() -------------------------------------------------------

    def _select_rows(self, rows: list[int]) -> None:
        if self.cmp_keys is not None:
            self.cmp_keys = [self.cmp_keys[i] for i in rows]
            self.cmp_values = [self.cmp_values[i] for i in rows]
        if self.valid is not None:
            self.valid = self.valid[torch.tensor(rows, dtype=torch.long, device=self.valid.device)]

    def reset(self) -> None:
        super().reset()
        self.clear_compressed()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_rows(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.cmp_keys is not None:
            self._select_rows([i for i in range(len(self.cmp_keys)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.cmp_keys is not None:
            rows = torch.arange(len(self.cmp_keys))[torch.as_tensor(indices).cpu()].tolist()
            self._select_rows(rows)

    def crop(self, tokens_to_remove: int) -> None:
        """Crop the dense cache as :class:`DynamicLayer` does (any transformers version's convention),
        then drop the compressed blocks that are no longer complete."""
        super().crop(tokens_to_remove)
        if self.valid is None or self.cmp_keys is None:
            return
        length = self.get_seq_length()
        self.valid = self.valid[:, :length]
        keep = [num_cmp_blocks(int(n), self.cmp_block, self.cmp_stride) for n in self.valid.sum(dim=1).tolist()]
        self.cmp_keys = [k[:n] for k, n in zip(self.cmp_keys, keep)]
        self.cmp_values = [v[:n] for v, n in zip(self.cmp_values, keep)]


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
