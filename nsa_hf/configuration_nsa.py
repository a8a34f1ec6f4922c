"""The NSA part of every NSA model configuration: the ``nsa_*`` fields, their validation and
:meth:`~NSAConfigMixin.nsa_params`.

A family's NSA configuration is ``class NSAXConfig(NSAConfigMixin, XConfig)`` with its own
``model_type`` (see ``configuration_nsa_llama.py``): every field of the dense configuration applies
unchanged, and the NSA fields below are added.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import field

from transformers import PreTrainedConfig

from nsa_kernels import NSAParams, validate_nsa_params

NSA_FIELDS = tuple(f.name for f in dataclasses.fields(NSAParams))
"""The NSA sizes, named as :class:`nsa_kernels.NSAParams` names them; the config field is ``nsa_<name>``."""


def _default_gate_bias() -> list[float]:
    return [-4.0, 0.0, 0.0]


class NSAConfigMixin(PreTrainedConfig):
    r"""
    The Native Sparse Attention (Yuan et al., 2025) fields of an NSA model configuration (sizes in tokens,
    defaults from the paper, one field ``nsa_<name>`` per field of :class:`nsa_kernels.NSAParams`).

    Args:
        nsa_cmp_block (`int`, *optional*, defaults to 32):
            Tokens per compression block (l).
        nsa_cmp_stride (`int`, *optional*, defaults to 16):
            Tokens between the starts of consecutive compression blocks (d); must divide `nsa_cmp_block`
            and `nsa_slc_block`.
        nsa_slc_block (`int`, *optional*, defaults to 64):
            Tokens per selection block (l').
        nsa_slc_count (`int`, *optional*, defaults to 16):
            Selection blocks attended per query (n), the forced ones included.
        nsa_init_blocks (`int`, *optional*, defaults to 1):
            Selection blocks at the start of the sequence that are always selected.
        nsa_local_blocks (`int`, *optional*, defaults to 2):
            Most recent selection blocks (the query's own included) that are always selected; at least 1.
        nsa_window (`int`, *optional*, defaults to 512):
            Tokens of the sliding-window branch (w), the query itself included.
        nsa_cmp_mlp_hidden (`int`, *optional*):
            Hidden width of the compression MLPs; `None` means `head_dim`.
        nsa_gate_init_bias (`list[float]`, *optional*, defaults to `[-4.0, 0.0, 0.0]`):
            Initial output bias of the gate MLP for the (compressed, selected, window) branches. The gate
            weights start at zero, so a freshly converted model starts with constant gates
            `sigmoid(bias)` = (0.018, 0.5, 0.5): exactly dense attention on sequences of up to
            `min(nsa_window, nsa_slc_count * nsa_slc_block)` tokens, apart from a small compressed term.
    """

    # The size fields, one per NSAParams field with its default (dataclass fields of the config).
    for _f in dataclasses.fields(NSAParams):
        __annotations__[f"nsa_{_f.name}"] = "int"
        locals()[f"nsa_{_f.name}"] = _f.default
    del _f
    nsa_cmp_mlp_hidden: int | None = None
    nsa_gate_init_bias: list[float] = field(default_factory=_default_gate_bias)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate_nsa()

    def _validate_nsa(self) -> None:
        """Raise ``ValueError`` naming the ``nsa_*`` field, its value and what is allowed."""
        name = type(self).__name__
        try:
            validate_nsa_params(**{f: getattr(self, f"nsa_{f}") for f in NSA_FIELDS})
        except ValueError as err:
            # The kernels name their fields without the config's ``nsa_`` prefix.
            raise ValueError(re.sub(r"NSA setting (\w+)=", rf"{name}.nsa_\1=", str(err))) from None
        hidden = self.nsa_cmp_mlp_hidden
        if hidden is not None and (not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1):
            raise ValueError(
                f"{name}.nsa_cmp_mlp_hidden={hidden!r} is invalid: must be None (= head_dim) or an integer >= 1."
            )
        bias = self.nsa_gate_init_bias
        if (
            not isinstance(bias, (list, tuple))
            or len(bias) != 3
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bias)
        ):
            raise ValueError(
                f"{name}.nsa_gate_init_bias={bias!r} is invalid: must be 3 finite numbers, the initial "
                "gate biases of the (cmp, slc, win) branches."
            )
        self.nsa_gate_init_bias = [float(b) for b in bias]
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"{name}.num_key_value_heads={self.num_key_value_heads} is invalid: must divide "
                f"num_attention_heads={self.num_attention_heads} (GQA groups)."
            )

    def nsa_params(self) -> NSAParams:
        """The NSA sizes as :class:`nsa_kernels.NSAParams`."""
        return NSAParams(**{f: getattr(self, f"nsa_{f}") for f in NSA_FIELDS})


__all__ = ["NSA_FIELDS", "NSAConfigMixin"]
