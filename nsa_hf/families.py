"""The model families nsa-hf converts: source ``model_type`` -> NSA ``model_type``.

This module holds data only (no imports), so that the attention backend, the conversion and the
package's registration all read the one table. Adding a family: see ``docs/families.md``.
"""

NSA_MODEL_TYPES = {
    "llama": "nsa_llama",
    "mistral": "nsa_mistral",
    "qwen2": "nsa_qwen2",
    "qwen3": "nsa_qwen3",
}
"""Dense ``model_type`` -> the ``model_type`` of its NSA counterpart (a config and model class of
:mod:`nsa_hf`)."""


def supported_model_types() -> str:
    """The convertible model types as text, for messages: ``'llama', 'mistral', 'qwen2', 'qwen3'``."""
    return ", ".join(repr(t) for t in NSA_MODEL_TYPES)


__all__ = ["NSA_MODEL_TYPES", "supported_model_types"]
