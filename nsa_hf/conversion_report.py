"""The report of a conversion: what was copied, what is new, and how far the untrained NSA model is
from the dense original (filled by :mod:`.evaluation`), with its text and JSON forms."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .configuration_nsa import NSA_FIELDS


@dataclass
class ConversionReport:
    """What :func:`nsa_hf.convert.convert_to_nsa` did and measured. Losses are mean next-token
    cross-entropy (nats) on the sample text; logit gaps compare the converted (untrained NSA) model's
    logits with the original's at every position."""

    source: str
    nsa_settings: dict
    dtype: str
    model_type: str | None = None
    nsa_model_type: str | None = None
    source_dtype: str | None = None
    weights_copied: int = 0
    parameters_copied: int = 0
    new_weights: list = field(default_factory=list)
    new_parameters: int = 0
    gate_init_bias: list | None = None
    eval_len: int | None = None
    eval_sequences: int = 0
    eval_tokens: int = 0
    text_source: str | None = None
    token_source: str | None = None
    sparse_from_position: int | None = None
    fully_sparse_from_position: int | None = None
    sparse_at_eval_len: bool | None = None
    keys_per_query: dict | None = None
    loss_original: float | None = None
    loss_converted: float | None = None
    logit_max_abs_gap: float | None = None
    logit_mean_abs_gap: float | None = None
    top1_agreement: float | None = None
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    @property
    def loss_gap(self) -> float | None:
        """``loss_converted - loss_original`` (positive: the untrained NSA model is worse)."""
        if self.loss_original is None or self.loss_converted is None:
            return None
        return self.loss_converted - self.loss_original

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (``loss_gap`` included)."""
        d = asdict(self)
        d["loss_gap"] = self.loss_gap
        return d

    def format(self) -> str:
        """A human-readable multi-line summary (what ``nsa-hf convert`` prints)."""
        s = self.nsa_settings
        kind = f"{self.model_type} -> {self.nsa_model_type}, " if self.model_type else ""
        stored = self.source_dtype or self.dtype
        dtype = self.dtype if stored == self.dtype else f"stored as {stored}, converted to {self.dtype}"
        lines = [
            f"source: {self.source} ({kind}{dtype})",
            "NSA settings: " + ", ".join(f"{k}={s[k]}" for k in NSA_FIELDS if k in s),
            f"weights copied exactly: {self.weights_copied} tensors ({self.parameters_copied:,} values)",
            f"new NSA weights: {len(self.new_weights)} tensors ({self.new_parameters:,} parameters)",
        ]
        if self.eval_len is None:
            lines.append("evaluation: skipped")
        else:
            lines.append(
                f"evaluation: {self.eval_sequences} sequence(s) x {self.eval_len} tokens from {self.text_source} "
                f"({self.token_source})"
            )
            if self.eval_len > self.fully_sparse_from_position:
                lines.append(
                    f"  queries attend sparsely from position {self.sparse_from_position} (window or selection) "
                    f"and in both branches from position {self.fully_sparse_from_position}"
                )
            elif self.sparse_at_eval_len:
                lines.append(
                    f"  queries attend sparsely from position {self.sparse_from_position}, in one branch only: both "
                    f"the window and the selection are sparse only from position {self.fully_sparse_from_position}"
                )
            else:
                lines.append(
                    f"  WARNING: at {self.eval_len} tokens NSA is still dense-equivalent (sparse from position "
                    f"{self.sparse_from_position}); the gap below does not measure the sparsity"
                )
            if self.keys_per_query:
                k = self.keys_per_query
                lines.append(
                    f"  keys per query (mean): cmp {k['cmp']:.1f} + slc {k['slc']:.1f} + win {k['win']:.1f} "
                    f"= {k['nsa']:.1f} vs dense {k['dense']:.1f}"
                )
            lines.append(
                f"  loss original {self.loss_original:.4f}, converted (untrained NSA) {self.loss_converted:.4f}, "
                f"gap {self.loss_gap:+.4f}"
            )
            lines.append(
                f"  logits |converted - original|: max {self.logit_max_abs_gap:.4f}, mean {self.logit_mean_abs_gap:.4f}; "
                f"top-1 agreement {100 * self.top1_agreement:.1f}%"
            )
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"time: {self.seconds:.1f} s")
        return "\n".join(lines)


__all__ = ["ConversionReport"]
