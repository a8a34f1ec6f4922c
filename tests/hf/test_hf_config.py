"""NSALlamaConfig (and every family's NSA config): defaults, validation errors per field, save/load round trip, nsa_params()."""
import json

import pytest
import torch

import nsa_hf  # noqa: F401  (registers NSA-Llama with the auto classes)
from nsa_hf import NSALlamaConfig
from nsa_kernels import NSAParams
from transformers import AutoConfig, LlamaConfig


def tiny(**kwargs):
    base = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
    return NSALlamaConfig(**{**base, **kwargs})


def test_defaults_are_the_papers_and_a_llama_config():
    cfg = NSALlamaConfig()
    assert isinstance(cfg, LlamaConfig) and cfg.model_type == "nsa_llama"
    assert cfg.nsa_params() == NSAParams()  # cmp 32/16, slc 64 x 16, 1 init + 2 local, window 512
    assert cfg.nsa_cmp_mlp_hidden is None
    assert cfg.nsa_gate_init_bias == [-4.0, 0.0, 0.0]


def test_nsa_params_maps_every_field():
    cfg = tiny(nsa_cmp_block=12, nsa_cmp_stride=6, nsa_slc_block=18, nsa_slc_count=5, nsa_init_blocks=2,
               nsa_local_blocks=3, nsa_window=40)
    assert cfg.nsa_params() == NSAParams(cmp_block=12, cmp_stride=6, slc_block=18, slc_count=5, init_blocks=2,
                                         local_blocks=3, window=40)


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("nsa_cmp_block", 0, "nsa_cmp_block"),
        ("nsa_cmp_block", 24, "nsa_cmp_block"),  # not a multiple of the stride 16
        ("nsa_cmp_stride", 64, "nsa_cmp_stride"),  # larger than the block
        ("nsa_cmp_stride", 1.5, "nsa_cmp_stride"),
        ("nsa_slc_block", 40, "nsa_slc_block"),  # not a multiple of the stride 16
        ("nsa_slc_count", 2, "nsa_slc_count"),  # fewer than init + local = 3
        ("nsa_init_blocks", -1, "nsa_init_blocks"),
        ("nsa_local_blocks", 0, "nsa_local_blocks"),
        ("nsa_window", 0, "nsa_window"),
        ("nsa_window", "512", "nsa_window"),
        ("nsa_cmp_mlp_hidden", 0, "nsa_cmp_mlp_hidden"),
        ("nsa_cmp_mlp_hidden", 8.0, "nsa_cmp_mlp_hidden"),
        ("nsa_gate_init_bias", [0.0, 0.0], "nsa_gate_init_bias"),
        ("nsa_gate_init_bias", [0.0, float("nan"), 0.0], "nsa_gate_init_bias"),
        ("nsa_gate_init_bias", [0.0, "x", 0.0], "nsa_gate_init_bias"),
    ],
)
def test_invalid_values_raise_naming_field_and_value(field, value, named):
    with pytest.raises(ValueError) as err:
        NSALlamaConfig(**{field: value})
    message = str(err.value)
    assert named in message
    assert repr(value) in message
    assert "must" in message  # says what is allowed


def test_gqa_group_must_divide_heads():
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        tiny(num_attention_heads=4, num_key_value_heads=3)


def test_gate_bias_accepts_ints_and_stores_floats():
    cfg = tiny(nsa_gate_init_bias=(-3, 1, 0))
    assert cfg.nsa_gate_init_bias == [-3.0, 1.0, 0.0]
    assert all(isinstance(b, float) for b in cfg.nsa_gate_init_bias)


def test_round_trip_save_load(tmp_path):
    torch.manual_seed(0)
    values = dict(nsa_cmp_block=8, nsa_cmp_stride=4, nsa_slc_block=16, nsa_slc_count=int(torch.randint(3, 9, ()).item()),
                  nsa_init_blocks=1, nsa_local_blocks=2, nsa_window=int(torch.randint(8, 100, ()).item()),
                  nsa_cmp_mlp_hidden=24, nsa_gate_init_bias=[-2.5, 0.25, -0.5])
    cfg = tiny(**values)
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "nsa_llama"
    for cls in (NSALlamaConfig, AutoConfig):
        loaded = cls.from_pretrained(tmp_path)
        assert type(loaded) is NSALlamaConfig
        for key, value in values.items():
            assert getattr(loaded, key) == value, key
        assert loaded.nsa_params() == cfg.nsa_params()
        assert loaded.hidden_size == 64 and loaded.num_key_value_heads == 2


def test_invalid_json_fails_on_load(tmp_path):
    tiny().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["nsa_slc_block"] = 10  # not a multiple of the stride
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="nsa_slc_block=10"):
        NSALlamaConfig.from_pretrained(tmp_path)


FAMILY_CONFIGS = {
    "nsa_mistral": ("NSAMistralConfig", "MistralConfig", dict(sliding_window=48, head_dim=24)),
    "nsa_qwen2": ("NSAQwen2Config", "Qwen2Config", dict(use_sliding_window=True, sliding_window=48,
                                                         max_window_layers=1, tie_word_embeddings=True)),
    "nsa_qwen3": ("NSAQwen3Config", "Qwen3Config", dict(head_dim=24, attention_bias=True)),
}


@pytest.mark.parametrize("model_type", list(FAMILY_CONFIGS))
def test_family_configs_are_their_family_plus_the_nsa_fields(model_type, tmp_path):
    import transformers

    nsa_name, dense_name, extra = FAMILY_CONFIGS[model_type]
    cls = getattr(nsa_hf, nsa_name)
    base = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
    cfg = cls(**base, **extra, nsa_window=40, nsa_gate_init_bias=[-3, 1, 0])
    dense = getattr(transformers, dense_name)(**base, **extra)
    assert isinstance(cfg, type(dense)) and cfg.model_type == model_type
    for key, value in dense.to_dict().items():
        if key not in ("model_type", "transformers_version"):
            assert getattr(cfg, key) == value, key
    assert cfg.nsa_params() == NSAParams(window=40) and cfg.nsa_gate_init_bias == [-3.0, 1.0, 0.0]
    cfg.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is cls
    assert {k: v for k, v in loaded.to_dict().items() if k != "_name_or_path"} == {
        k: v for k, v in cfg.to_dict().items() if k != "_name_or_path"}
    with pytest.raises(ValueError, match=rf"{nsa_name}.nsa_window=0"):
        cls(**base, nsa_window=0)
