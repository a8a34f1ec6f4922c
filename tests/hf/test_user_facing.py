"""What a user sees: the model card's metadata and snippets, the version, help texts, and the warnings
for settings that silently do something else than NSA."""
import importlib.metadata
import warnings
from pathlib import Path

import pytest
import torch
from tests.hf.test_hub import tiny_nsa_model
from transformers import AutoModelForCausalLM

import nsa_hf
from nsa_hf import cli, model_card

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def card_template(monkeypatch):
    """The template of this source tree (an editable install may map ``nsa_hf.model_cards`` elsewhere)."""
    monkeypatch.setattr(model_card, "template_text", lambda: (REPO / "model_cards" / model_card.TEMPLATE).read_text())


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_card_names_a_local_source_by_folder_and_reads_its_metadata(card_template, tmp_path):
    config = tiny_nsa_model().config
    # A snapshot in the Hugging Face cache: its Hub id is in the path, its license in its card.
    snapshot = tmp_path / "hub" / "models--some-org--Tiny-Llama" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Tiny\n")
    card = model_card.render_model_card(config, {"source": str(snapshot)})
    assert card.data.base_model == "some-org/Tiny-Llama" and card.data.license == "apache-2.0"
    assert "(https://huggingface.co/some-org/Tiny-Llama)" in card.text
    # Any other local folder: named by its folder name, never by the converting machine's path.
    plain = tmp_path / "my-llama"
    plain.mkdir()
    card = model_card.render_model_card(config, {"source": str(plain)}, license="mit")
    assert card.data.base_model is None and card.data.license == "mit"
    assert str(tmp_path) not in str(card) and "a local Llama checkpoint (`my-llama`)" in card.text
    # Given values win over what the source says.
    card = model_card.render_model_card(config, {"source": str(snapshot)}, base_model="x/y", license="mit")
    assert card.data.base_model == "x/y" and card.data.license == "mit"


def test_card_remote_code_snippet_and_its_absence(card_template):
    config = tiny_nsa_model().config
    usage = _section(model_card.render_model_card(config, repo_id="me/nsa").text, "Usage")
    # Without nsa-hf the tokenizer also needs trust_remote_code (it reads the custom config): both get it.
    assert 'AutoModelForCausalLM.from_pretrained("me/nsa", trust_remote_code=True)' in usage
    assert 'AutoTokenizer.from_pretrained("me/nsa", trust_remote_code=True)' in usage
    usage = _section(model_card.render_model_card(config, repo_id="me/nsa", remote_code=False).text, "Usage")
    assert "trust_remote_code=True)" not in usage and "needs the\nnsa-hf package" in usage
    assert "import nsa_hf" in usage


def test_version_has_one_source(capsys):
    assert nsa_hf.__version__ == importlib.metadata.version("nsa-hf")
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"nsa-hf {nsa_hf.__version__}"


def test_every_cli_flag_has_help():
    import argparse

    parsers = [cli.build_parser()]
    for action in parsers[0]._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    missing = [(p.prog, a.option_strings or a.dest) for p in parsers for a in p._actions if not a.help]
    assert not missing, f"options without help: {missing}"


def _nsa_warnings(caught, text):
    return [w for w in caught if issubclass(w.category, UserWarning) and text in str(w.message)]


def test_loading_with_a_dense_implementation_warns_once(tmp_path):
    tiny_nsa_model().save_pretrained(tmp_path / "m")
    for implementation in ("sdpa", "eager"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # what a user gets: once per place in the code
            AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation=implementation)
        found = _nsa_warnings(caught, "computes dense attention")
        assert len(found) == 1, [str(w.message) for w in caught]
        assert f"attn_implementation='{implementation}'" in str(found[0].message)
        assert "keep attn_implementation='nsa'" in str(found[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert not _nsa_warnings(caught, "dense attention") and model.config._attn_implementation == "nsa"


def test_output_attentions_with_nsa_says_why_it_is_empty():
    model = tiny_nsa_model()
    ids = torch.randint(0, 96, (1, 20))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = model(ids, output_attentions=True)
    assert out.attentions == ()
    found = _nsa_warnings(caught, "output_attentions=True")
    assert found and "attn_implementation='eager'" in str(found[0].message)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(ids)
        model.set_attn_implementation("eager")
        out = model(ids, output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (1, 4, 20, 20)
    assert not _nsa_warnings(caught, "output_attentions=True")


def test_attention_repr_shows_the_nsa_sizes():
    text = repr(tiny_nsa_model().model.layers[0].self_attn)
    first = text.splitlines()[1]  # torch puts extra_repr first inside the parentheses
    for part in ("heads=4", "kv_heads=2", "head_dim=8", "cmp_block=8", "cmp_stride=4", "slc_block=8", "slc_count=4",
                 "init_blocks=1", "local_blocks=2", "window=16"):
        assert part in first, first
