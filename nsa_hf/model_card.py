"""Model cards for NSA-Llama checkpoints, rendered from the Jinja template ``model_cards/nsa_llama.md``
(installed as ``nsa_hf.model_cards``) with ``huggingface_hub.ModelCard.from_template``."""
from __future__ import annotations

import importlib.resources
import os
from collections.abc import Mapping
from pathlib import Path

TEMPLATE = "nsa_llama.md"
TAGS = ["nsa", "native-sparse-attention", "sparse-attention"]

_SETTINGS = (
    ("compression block (l)", "cmp_block", "tokens per compression block"),
    ("compression stride (d)", "cmp_stride", "tokens between consecutive compression blocks"),
    ("selection block (l')", "slc_block", "tokens per selection block"),
    ("selected blocks (n)", "slc_count", "selection blocks attended per query, forced ones included"),
    ("initial blocks", "init_blocks", "first selection blocks always attended"),
    ("local blocks", "local_blocks", "most recent selection blocks always attended"),
    ("window (w)", "window", "tokens of the sliding window"),
    ("compressor hidden size", "cmp_mlp_hidden", "hidden width of the compressor MLP (None: head_dim)"),
    ("gate initial bias", "gate_init_bias", "initial gate bias (cmp, slc, win); gate = sigmoid"),
)


def template_text() -> str:
    """The card template shipped with nsa-hf."""
    return importlib.resources.files("nsa_hf.model_cards").joinpath(TEMPLATE).read_text(encoding="utf-8")


def _family(config) -> str:
    """The dense family's name as the architecture spells it: 'Llama', 'Qwen2', ..."""
    arch = (getattr(config, "architectures", None) or ["NSALlamaForCausalLM"])[0]
    return arch.removeprefix("NSA").removesuffix("ForCausalLM") or "Llama"


def nsa_settings_rows(config) -> list[dict]:
    """One row per NSA setting of an ``NSALlamaConfig``: name, config field, value, meaning."""
    rows = []
    for name, key, meaning in _SETTINGS:
        field = f"nsa_{key}"
        rows.append({"name": name, "field": field, "value": getattr(config, field, None), "meaning": meaning})
    return rows


def source_metadata(source) -> dict:
    """Card metadata a local source checkpoint gives: ``base_model`` when the folder is a snapshot in the
    Hugging Face cache (``.../models--OWNER--NAME/snapshots/REVISION``), ``license`` from its own model card.
    Empty for anything else (a Hub id names itself)."""
    if source is None or not os.path.isdir(os.fspath(source)):
        return {}
    path = Path(source).resolve()
    meta = {}
    for part in path.parts:
        if part.startswith("models--") and part.count("--") >= 2:
            meta["base_model"] = "/".join(part[len("models--"):].split("--", 1))
    readme = path / "README.md"
    if readme.is_file():
        try:
            from huggingface_hub import ModelCard

            license = getattr(ModelCard.load(readme).data, "license", None)
        except Exception:  # a malformed card gives no metadata, it does not stop the card
            license = None
        if license:
            meta["license"] = license
    return meta


def source_label(source) -> str | None:
    """How the card names the source: a Hub id as it is, a local folder by its name only (the path of
    the machine that converted it means nothing to a reader)."""
    if source is None:
        return None
    text = os.fspath(source)
    if os.path.isabs(text) or os.path.exists(text) or text.startswith((".", "~")):
        return f"a local Llama checkpoint (`{Path(text).name or text}`)"
    return text


def _as_mapping(report):
    if report is None or isinstance(report, Mapping):
        return report
    return report.to_dict()


def render_model_card(
    config,
    report=None,
    *,
    base_model: str | None = None,
    license: str | None = None,
    training: Mapping | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    datasets: list[str] | None = None,
    remote_code: bool = True,
):
    """Render the NSA-Llama model card.

    Args:
        config: the model's ``NSALlamaConfig``.
        report: a ``ConversionReport`` (or its ``to_dict()``) from :func:`nsa_hf.convert.convert_llama_to_nsa`.
        base_model: Hub id of the dense base model (metadata ``base_model``), when it has one.
        license: license identifier for the metadata (e.g. ``"apache-2.0"``), when known.
        training: what continued training did (e.g. ``{"steps": 2000, "data": "...", "final loss": 2.1}``);
            ``None`` writes a placeholder saying the model is untrained since conversion.
        repo_id: the id shown in the usage snippets (default ``"path/to/this/model"``).
        model_name: the title (default: ``repo_id``'s last part, or ``<base>-NSA``).
        datasets: Hub ids of training data sets, for the metadata.
        remote_code: whether the checkpoint carries its modeling code (``save_pretrained`` of an NSA model
            writes it unless given ``remote_code=False``): the card then shows ``trust_remote_code`` loading;
            else it says that loading needs nsa-hf.

    ``base_model`` and ``license`` left out are read from a local source checkpoint where it has them
    (:func:`source_metadata`).

    Returns:
        a ``huggingface_hub.ModelCard``; ``.save(path)`` writes it.
    """
    from huggingface_hub import ModelCard, ModelCardData

    report = _as_mapping(report)
    source = (report or {}).get("source")
    found = source_metadata(source)
    base_model = base_model or found.get("base_model")
    license = license or found.get("license")
    if model_name is None:
        if repo_id:
            model_name = repo_id.rstrip("/").split("/")[-1]
        elif base_model:
            model_name = f"{base_model.split('/')[-1]}-NSA"
        else:
            model_name = f"NSA-{_family(config)}"
    data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        license=license,
        pipeline_tag="text-generation",
        tags=[*TAGS, config.model_type.removeprefix("nsa_")],
        datasets=datasets,
        model_name=model_name,
    )
    return ModelCard.from_template(
        data,
        template_str=template_text(),
        model_name=model_name,
        base_model=base_model,
        source=source_label(source),
        remote_code=remote_code,
        settings=nsa_settings_rows(config),
        report=report,
        training=dict(training) if training else None,
        repo_id=repo_id or "path/to/this/model",
        family=_family(config),
        architecture=(getattr(config, "architectures", None) or ["NSALlamaForCausalLM"])[0],
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        vocab_size=config.vocab_size,
    )
