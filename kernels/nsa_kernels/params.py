"""NSA hyper-parameters and their validation.

Every size is in tokens. The defaults are the paper's (Yuan et al., 2025, Section 4.1):
compression blocks of l=32 tokens every d=16 tokens, selection blocks of l'=64 tokens, n=16 selected
blocks of which 1 initial and 2 local are always kept, and a sliding window of w=512 tokens.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class NSAParams:
    """Sizes that define Native Sparse Attention for one layer.

    Attributes:
        cmp_block: l, tokens per compression block.
        cmp_stride: d, tokens between the starts of consecutive compression blocks (d <= l; the
            blocks overlap when d < l). Must divide ``cmp_block`` and ``slc_block``.
        slc_block: l', tokens per selection block.
        slc_count: n, selection blocks attended per query (forced blocks included).
        init_blocks: selection blocks at the start of the sequence that are always selected.
        local_blocks: most recent selection blocks (the query's own included) always selected.
        window: w, tokens of the sliding-window branch (the query itself included).
    """

    cmp_block: int = 32
    cmp_stride: int = 16
    slc_block: int = 64
    slc_count: int = 16
    init_blocks: int = 1
    local_blocks: int = 2
    window: int = 512

    def __post_init__(self):
        validate_nsa_params(**asdict(self))


def _require(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"NSA setting {field}={value!r} is invalid: {allowed}.")


def validate_nsa_params(
    cmp_block: int,
    cmp_stride: int,
    slc_block: int,
    slc_count: int,
    init_blocks: int,
    local_blocks: int,
    window: int,
) -> None:
    """Raise ``ValueError`` naming the field, its value and what is allowed, for any bad setting."""
    for name, value in (
        ("cmp_block", cmp_block),
        ("cmp_stride", cmp_stride),
        ("slc_block", slc_block),
        ("slc_count", slc_count),
        ("window", window),
    ):
        _require(isinstance(value, int) and not isinstance(value, bool), name, value, "must be an integer")
        _require(value >= 1, name, value, "must be >= 1")
    for name, value in (("init_blocks", init_blocks), ("local_blocks", local_blocks)):
        _require(isinstance(value, int) and not isinstance(value, bool), name, value, "must be an integer")
        _require(value >= 0, name, value, "must be >= 0")
    _require(
        cmp_stride <= cmp_block,
        "cmp_stride",
        cmp_stride,
        f"must be <= cmp_block ({cmp_block}), or some keys would belong to no compression block",
    )
    _require(
        cmp_block % cmp_stride == 0,
        "cmp_block",
        cmp_block,
        f"must be a multiple of cmp_stride ({cmp_stride}), e.g. {cmp_stride * max(1, round(cmp_block / cmp_stride))}",
    )
    _require(
        slc_block % cmp_stride == 0,
        "slc_block",
        slc_block,
        f"must be a multiple of cmp_stride ({cmp_stride}), e.g. {cmp_stride * max(1, round(slc_block / cmp_stride))}",
    )
    _require(
        local_blocks >= 1,
        "local_blocks",
        local_blocks,
        "must be >= 1: the query's own selection block is always attended (causal diagonal)",
    )
    _require(
        init_blocks + local_blocks <= slc_count,
        "slc_count",
        slc_count,
        f"must be >= init_blocks + local_blocks = {init_blocks} + {local_blocks}, the blocks always selected",
    )


def num_cmp_blocks(seq_len: int, cmp_block: int, cmp_stride: int) -> int:
    """Number of complete compression blocks in a sequence of ``seq_len`` tokens."""
    if seq_len < cmp_block:
        return 0
    return (seq_len - cmp_block) // cmp_stride + 1
