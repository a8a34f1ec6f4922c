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

The attention backend drives it through one call per path, as transformers' ``DynamicIndexedLayer``
owns its indexer keys:

* the varlen path (prefill, packed or irregular masks, CPU by default): :meth:`update_compressed`
  gets the mask of real cached positions and a function that compresses given blocks; the layer decides
  which blocks are new (those not already stored for a prefix of the same mask), stores them, and
  returns every row's compressed keys/values;
* the decode path (Triton decode kernels, a few query tokens on a left-padded cache, see
  :mod:`.decoding`): :meth:`decode_compressed` checks that the stored state covers the previous
  positions (host-only for left-aligned rows), stores the blocks the new tokens complete at their slots,
  records the new counts without a host sync, and returns the ``(B, Hkv, capacity, D)`` buffers;
  :meth:`NSAStaticCacheLayer.static_decode_compressed` does the same with no host work at all.

Beam search, contrastive search and assisted decoding reorder, select, repeat or crop the cache; those
methods keep the compressed state in step with the dense one.
"""
from __future__ import annotations

import functools
import inspect

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache, StaticLayer

from nsa_kernels import num_cmp_blocks

_MIN_CAPACITY = 16


class NSACompressedState:
    """The compressed keys/values of each batch row, kept beside a cache layer's dense keys/values
    (mixed into :class:`NSACacheLayer` and :class:`NSAStaticCacheLayer`).

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

    def update_compressed(self, compress, lens_k: list[int], cmp_block: int, cmp_stride: int,
                          valid: torch.Tensor | None = None, left_aligned: bool = False):
        """The varlen path's call: every sequence's compressed keys and values after this step.

        Args:
            compress: ``compress(first) -> (keys, values)``, lists of ``(n_s, Hkv, D)``: the blocks
                ``first[s]`` up to the last complete one of each sequence (see
                :func:`.packing.compress_packed`).
            lens_k: real tokens per sequence (host list).
            cmp_block, cmp_stride: the compression block sizes.
            valid: ``(B, KV)`` mask of the real tokens among the cached positions (this step's keys
                appended), one sequence per row; ``None`` for packed documents, which have no per-row
                state: the stored state is dropped and every block compressed.
            left_aligned: ``valid`` is padding followed by real tokens in every row.

        Returns:
            ``(keys, values)``: lists of each sequence's ``(N_s, Hkv, D)`` compressed tokens. Blocks already
            stored for a prefix of ``valid`` (same block sizes) are not recompressed.
        """
        if valid is None:
            self.clear_compressed()
            return compress([0] * len(lens_k))
        first = self._stored_counts(valid, cmp_block, cmp_stride)
        new_keys, new_values = compress(first)
        return self._append_compressed(valid, new_keys, new_values, real_lens=lens_k, left_aligned=left_aligned)


    def _stored_counts(self, valid: torch.Tensor, cmp_block: int, cmp_stride: int) -> list[int]:
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

    def _append_compressed(
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

    def decode_compressed(self, valid: torch.Tensor, q_len: int, k_lens: list[int], counts: torch.Tensor,
                          host_counts: list[int], slots: torch.Tensor, capacity: int, compress,
                          cmp_block: int, cmp_stride: int):
        """The decode path's call (dynamic cache), for a step of ``q_len`` new tokens per row.

        Args:
            valid: ``(B, KV)`` left-aligned mask of the real cached positions, this step's included.
            k_lens: real tokens per row (host list, ``valid.sum(1)``).
            counts, host_counts: compressed blocks per row after the step (``(B,)`` int32 on the device,
                and the same as a host list).
            slots: ``(B, J)`` slots of the candidate blocks that may end among the new tokens.
            capacity: slots the candidates need.
            compress: ``compress() -> (keys, values)`` ``(B, Hkv, J, D)``, the candidate blocks, or
                ``None`` when no row completes a block in this step.

        Returns:
            ``(cmp_k, cmp_v)``, the ``(B, Hkv, capacity, D)`` buffers, or ``None`` when the stored state
            does not cover exactly the previous positions (the varlen path then rebuilds it).
        """
        past_real = [n - q_len for n in k_lens]
        if not self._decode_ready(valid.shape[0], valid.shape[1] - q_len, past_real, cmp_block, cmp_stride, valid):
            return None
        if compress is not None:
            keys, values = compress()
            self._write_compressed(slots, keys, values, capacity)
        self._set_decode_state(valid, counts, host_counts, k_lens)
        return self.cmp_k, self.cmp_v


    def _decode_ready(self, batch: int, past_len: int, past_real: list[int], cmp_block: int, cmp_stride: int,
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

    def _write_compressed(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        """Store ``keys``/``values`` ``(B, Hkv, J, D)`` at the per-row slots ``slots`` ``(B, J)`` (distinct
        within a row), after growing to at least ``capacity`` slots. Slots at or beyond a row's count
        are scratch, so candidates that did not complete may be written there."""
        batch, heads, _, dim_k = keys.shape
        self.ensure_capacity(capacity, batch, heads, dim_k, values.shape[-1], keys.dtype, keys.device)
        idx = slots[:, None, :, None]
        self.cmp_k.scatter_(2, idx.expand(-1, heads, -1, dim_k), keys)
        self.cmp_v.scatter_(2, idx.expand(-1, heads, -1, values.shape[-1]), values)

    def _set_decode_state(self, valid: torch.Tensor, cmp_len: torch.Tensor, cmp_counts: list[int],
                         real_lens: list[int]) -> None:
        """Record the state after a decode step: ``valid`` (left-aligned), the per-row block counts (device
        tensor and host list, no copy between them) and real-token counts."""
        self.valid = valid
        self.cmp_len = cmp_len
        self.cmp_counts = list(cmp_counts)
        self.real_lens = list(real_lens)
        self.left_aligned, self._aligned_valid = True, valid

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

    # -- cache manipulations used by generate() (beam search, contrastive search, assisted decoding) ---

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


class NSACacheLayer(NSACompressedState, DynamicLayer):
    """A :class:`DynamicLayer` that also keeps each row's compressed keys/values (see
    :class:`NSACompressedState`)."""

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


def _mark_static(*tensors: torch.Tensor) -> None:
    """Tag the fixed-address tensors of a static cache layer as :class:`StaticLayer` tags its keys/values
    (``torch._dynamo.mark_static_address``), so that compiled decoding steps update them in place and CUDA
    graphs need not copy them; not while tracing (where the tag is not supported)."""
    if not torch.compiler.is_compiling():
        for t in tensors:
            torch._dynamo.mark_static_address(t)


class NSAStaticCacheLayer(NSACompressedState, StaticLayer):
    """A :class:`StaticLayer` (dense keys/values of a fixed ``max_cache_len``, written in place at
    ``cumulative_length``) whose compressed state also has a fixed size and fixed addresses, so that a
    decoding step can run without any host synchronisation and be captured in a CUDA graph.

    The compressed buffers hold ``static_capacity()`` tokens per row: every block of ``max_cache_len``
    positions plus the candidate slots of a ``max_decode_queries``-token step. They are allocated once
    (per batch shape) by the first (eager) prefill and reused after :meth:`reset`. A decoding step reads and
    updates in place ``keys``, ``values``, ``cumulative_length`` (as a :class:`StaticLayer`) and ``cmp_k``,
    ``cmp_v``, ``cmp_len``, ``left_pad``: the tensors to register as buffers of a module given to
    ``torch.export`` (see docs/fallback.md).

    Extra attributes:
        left_pad: ``(B,)`` int32, padding positions before each row's first real token, recorded by the
            varlen path (prefill); a decoding step reads row ``b`` as positions
            ``[left_pad[b], cumulative_length)``.
        static_ready: the compressed state and ``left_pad`` cover every cached position and the rows
            are left-aligned (padding, then real tokens): decoding steps may take the graph-safe path,
            which trusts them and ignores the attention mask.
    """

    max_decode_queries = 16

    def __init__(self, max_cache_len: int, **kwargs):
        self._static_bufs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._len_buf: torch.Tensor | None = None
        self.left_pad: torch.Tensor | None = None
        self.static_ready = False
        super().__init__(max_cache_len=max_cache_len, **kwargs)

    def static_capacity(self) -> int:
        """Compressed slots per row: all blocks of ``max_cache_len`` positions plus one step's candidates."""
        l, d = self.cmp_block or 1, self.cmp_stride or 1
        return num_cmp_blocks(self.max_cache_len, l, d) + -(-self.max_decode_queries // d)

    def clear_compressed(self) -> None:
        super().clear_compressed()
        self.static_ready = False

    def ensure_capacity(self, needed: int, batch: int, heads: int, dim_k: int, dim_v: int, dtype, device) -> None:
        """Point ``cmp_k``/``cmp_v`` at the fixed buffers (allocated on first use or when the batch shape,
        dtype or device changes; never grown)."""
        cap = self.static_capacity()
        if needed > cap:
            raise ValueError(
                f"{needed} compressed tokens per row exceed the static cache's capacity {cap} "
                f"(max_cache_len={self.max_cache_len}); build the cache with a larger max_cache_len"
            )
        bufs = self._static_bufs
        shape_k, shape_v = (batch, heads, cap, dim_k), (batch, heads, cap, dim_v)
        if (
            bufs is None
            or tuple(bufs[0].shape) != shape_k
            or tuple(bufs[1].shape) != shape_v
            or bufs[0].dtype != dtype
            or bufs[0].device != torch.device(device)
        ):
            bufs = (torch.zeros(shape_k, dtype=dtype, device=device), torch.zeros(shape_v, dtype=dtype, device=device))
            _mark_static(*bufs)
            self._static_bufs = bufs
        self.cmp_k, self.cmp_v = bufs

    def _set_counts(self, counts: list[int], device_counts: torch.Tensor | None = None) -> None:
        self.cmp_counts = list(counts)
        src = device_counts if device_counts is not None else torch.tensor(counts, dtype=torch.int32)
        buf = self._len_buf
        if buf is None or buf.shape[0] != len(counts) or buf.device != self.cmp_k.device:
            buf = self._len_buf = torch.zeros(len(counts), dtype=torch.int32, device=self.cmp_k.device)
            _mark_static(buf)
        buf.copy_(src)
        self.cmp_len = buf

    def update_compressed(self, compress, lens_k, cmp_block, cmp_stride, valid=None, left_aligned=False):
        """As :meth:`NSACompressedState.update_compressed`; also records each row's left padding and
        whether decoding steps may take the graph-safe path (one left-aligned sequence per row)."""
        out = super().update_compressed(compress, lens_k, cmp_block, cmp_stride, valid, left_aligned)
        ready = valid is not None and left_aligned
        left_pad = (valid.shape[1] - valid.sum(1)).to(torch.int32) if ready else None
        self._set_static_rows(left_pad, ready)
        return out

    def static_decode_compressed(self, slots: torch.Tensor, counts: torch.Tensor, compress):
        """The graph-safe decode call: store the candidate blocks ``compress() -> (keys, values)``
        ``(B, Hkv, J, D)`` at ``slots`` ``(B, J)`` and set the per-row counts to ``counts`` (device), with
        no host synchronisation. Returns ``(cmp_k, cmp_v, cmp_len)``."""
        keys, values = compress()
        self._write_compressed(slots, keys, values, self.static_capacity())
        self.cmp_len.copy_(counts)
        return self.cmp_k, self.cmp_v, self.cmp_len

    def _set_static_rows(self, left_pad: torch.Tensor | None, ready: bool) -> None:
        """Record, after a varlen step, each row's left padding and whether decoding steps may take the
        graph-safe path (``ready``: one left-aligned sequence per row)."""
        self.static_ready = bool(ready and left_pad is not None)
        if left_pad is None:
            return
        if self.left_pad is None or self.left_pad.shape != left_pad.shape or self.left_pad.device != left_pad.device:
            self.left_pad = torch.zeros(left_pad.shape, dtype=torch.int32, device=left_pad.device)
            _mark_static(self.left_pad)
        self.left_pad.copy_(left_pad)

    # -- rows and length edits made by generate(): beam search, batch selection, assisted decoding -----
    #
    # Every row is one left-padded sequence (``left_pad``); rows that stopped at EOS keep decoding padding
    # tokens like any other row, so they need nothing here. Edits that keep the batch size work in place,
    # so that the buffers keep the addresses a captured or compiled decoding step reads.

    is_croppable = True

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes row ``beam_idx[i]``, in place (dense and compressed keys/values,
        block counts, left padding). The varlen path's host-side record of the rows is dropped (its next
        step, if any, recompresses from the dense keys); the static decode path does not read it."""
        if not self.is_initialized:
            return
        for buf in (self.keys, self.values, self.cmp_k, self.cmp_v, self.cmp_len, self.left_pad):
            if buf is not None:
                buf.copy_(buf.index_select(0, beam_idx.to(buf.device)))
        self.valid = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows ``indices`` (new buffers: the batch size changes)."""
        if self.is_initialized:
            self._resize_rows(torch.arange(self.keys.shape[0])[torch.as_tensor(indices).cpu()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times in place of the row (new buffers: the batch size changes)."""
        if self.is_initialized:
            self._resize_rows(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))

    def _resize_rows(self, rows: torch.Tensor) -> None:
        self.keys = self.keys.index_select(0, rows.to(self.keys.device))
        self.values = self.values.index_select(0, rows.to(self.values.device))
        self.batch_size = self.keys.shape[0]
        _mark_static(self.keys, self.values)
        self._select_rows(rows.tolist())

    def _select_rows(self, rows: list[int]) -> None:
        super()._select_rows(rows)
        if self.cmp_k is not None:
            self._static_bufs, self._len_buf = (self.cmp_k, self.cmp_v), self.cmp_len
            _mark_static(self.cmp_k, self.cmp_v, self.cmp_len)
        if self.left_pad is not None:
            self.left_pad = self.left_pad[torch.tensor(rows, dtype=torch.long, device=self.left_pad.device)]
            _mark_static(self.left_pad)

    def crop(self, tokens_to_remove: int) -> None:
        """Assisted decoding: forget the last ``-tokens_to_remove`` positions (a count <= 0, as
        ``generate()`` passes it) by moving ``cumulative_length`` back in place; the dense keys beyond it
        are overwritten by the next step. The static decode path recomputes every row's block count from
        the length, so blocks completed by the dropped positions are not read (and are rewritten when they
        complete again); the varlen path's host-side record of the rows is dropped (its next step
        recompresses). Works on every transformers version (5.17's ``StaticLayer`` has no ``crop``)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"NSAStaticCacheLayer.crop takes minus the number of positions to remove (got {tokens_to_remove}); "
                "pass e.g. -3 to drop the last 3 positions"
            )
        if tokens_to_remove < 0 and self.is_initialized:
            self.cumulative_length.sub_(-tokens_to_remove)
            self.valid = None


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


class NSAStaticCache(StaticCache):
    """A :class:`StaticCache` whose layers are :class:`NSAStaticCacheLayer`: fixed-size dense and
    compressed keys/values, for decoding loops captured in CUDA graphs (see
    :func:`nsa_hf.generation.static_greedy_generate`) and ``generate(cache_implementation="static")``.

    Args:
        config: the model config (one layer per hidden layer).
        max_cache_len: positions per row (prompt, padding included, plus new tokens).
        offloading, offload_only_non_sliding: as for :class:`StaticCache`.
    """

    def __init__(self, config, max_cache_len: int, offloading: bool = False, offload_only_non_sliding: bool = True,
                 **kwargs):
        if int(max_cache_len) <= 0:
            raise ValueError(f"max_cache_len must be a positive number of positions; got {max_cache_len}")
        num_layers = config.get_text_config(decoder=True).num_hidden_layers
        layers = [NSAStaticCacheLayer(max_cache_len=int(max_cache_len)) for _ in range(num_layers)]
        Cache.__init__(self, layers=layers, offloading=offloading, offload_only_non_sliding=offload_only_non_sliding)


def static_cache_length(needed: int, shortest: int = 256) -> int:
    """The length of the static cache that ``generate()`` builds by default for ``needed`` positions (prompt,
    padding included, plus new tokens): ``needed`` rounded up to one of four steps per power of two (at
    most 25 % more positions), and at least ``shortest``. Compiled decoding steps and their CUDA graphs are
    specific to the cache length, so prompts whose lengths round to the same bucket reuse them."""
    needed = int(needed)
    if needed <= shortest:
        return shortest
    step = 1 << (needed.bit_length() - 3)  # 2**k <= needed < 2**(k+1): steps of 2**(k-2)
    return -(-needed // step) * step


def nsa_cache_layer(past_key_values, layer_idx: int) -> NSACompressedState | StaticLayer | None:
    """The :class:`NSACacheLayer` or :class:`NSAStaticCacheLayer` of ``layer_idx`` in ``past_key_values``, a
    plain transformers :class:`StaticLayer` (no compressed state: the backend compresses every block of its
    dense keys at each step, e.g. in transformers' export recipes), or ``None`` when the cache is absent or of
    another kind (the backend then recompresses from the dense keys)."""
    layers = getattr(past_key_values, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    return layer if isinstance(layer, (NSACompressedState, StaticLayer)) else None


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(model_class: type) -> str:
    try:
        params = inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model) -> str:
    """The keyword under which ``model``'s forward takes its cache: ``"cache"`` where the forward has it
    (transformers >= 5.24, and NSA-Llama under any version), else ``"past_key_values"`` (transformers
    < 5.24). Passing ``past_key_values=`` to a 5.24 model still works but warns; use
    ``model(..., **{cache_kwarg(model): cache})`` to avoid the warning on every version."""
    return _cache_kwarg_of(type(model))
