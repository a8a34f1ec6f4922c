"""Dataset loading, document chunking and staged trainability used by the training examples."""
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nsa_hf.training import chunk_documents, is_nsa_parameter, load_text_dataset, set_trainable


def _word_tokenizer(words):
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>"] + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def test_load_text_and_json_files(tmp_path):
    docs = ["alpha beta gamma " * 5, "delta epsilon", "zeta eta theta iota " * 3]
    for i, d in enumerate(docs):
        (tmp_path / f"d{i}.txt").write_text(d)
    ds = load_text_dataset([tmp_path / f"d{i}.txt" for i in range(3)])
    assert sorted(ds["text"]) == sorted(docs)  # one row per file: documents stay whole
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    assert load_text_dataset([tmp_path / "rows.jsonl"])["text"] == docs
    with pytest.raises(ValueError, match="share one supported type"):
        load_text_dataset([tmp_path / "d0.txt", tmp_path / "rows.jsonl"])
    with pytest.raises(FileNotFoundError):
        load_text_dataset([tmp_path / "d0.txt", tmp_path / "missing.txt"])


def test_chunk_documents_keeps_pieces_inside_one_document(tmp_path):
    words_a = [f"a{i}" for i in range(23)]
    words_b = [f"b{i}" for i in range(9)]
    tok = _word_tokenizer(words_a + words_b)
    import datasets

    ds = datasets.Dataset.from_dict({"text": [" ".join(words_a), " ".join(words_b)]})
    pieces = chunk_documents(ds, tok, seq_len=7)["input_ids"]
    assert all(2 <= len(p) <= 7 for p in pieces)
    eos = tok.eos_token_id
    # Concatenating the pieces gives back each document followed by EOS, in order.
    flat = [t for p in pieces for t in p]
    want = tok(" ".join(words_a))["input_ids"] + [eos] + tok(" ".join(words_b))["input_ids"] + [eos]
    assert flat == want
    # No piece mixes tokens of both documents.
    a_ids = set(tok(" ".join(words_a))["input_ids"])
    for p in pieces:
        body = [t for t in p if t != eos]
        assert all(t in a_ids for t in body) or not any(t in a_ids for t in body)
    with pytest.raises(ValueError, match="text_column='body'"):
        chunk_documents(ds, tok, seq_len=7, text_column="body")


def test_set_trainable_stages():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(4, 4)
            self.nsa_gate = torch.nn.Linear(4, 6)
            self.nsa_cmp_k = torch.nn.Linear(4, 4)

    model = torch.nn.Sequential(Attn(), torch.nn.Linear(4, 4))
    n = set_trainable(model, "nsa")
    assert n == 4 * 6 + 6 + 4 * 4 + 4
    assert {k for k, p in model.named_parameters() if p.requires_grad} == {
        "0.nsa_gate.weight", "0.nsa_gate.bias", "0.nsa_cmp_k.weight", "0.nsa_cmp_k.bias"}
    assert set_trainable(model, "all") == sum(p.numel() for p in model.parameters())
    assert not is_nsa_parameter("model.layers.0.mlp.gate_proj.weight")
    with pytest.raises(ValueError, match="which='some'"):
        set_trainable(model, "some")
    with pytest.raises(ValueError, match="no NSA modules"):
        set_trainable(torch.nn.Linear(2, 2), "nsa")


def test_check_data_tells_missing_files_from_hub_names(tmp_path):
    from nsa_hf.training import check_data

    (tmp_path / "a.txt").write_text("x")
    check_data([tmp_path / "a.txt"])
    for hub_name in ("wikitext", "owner/name"):
        check_data([hub_name])  # taken for a Hub dataset id: not checked here
    for missing in (["missing.txt"], ["./data"], [str(tmp_path / "dir" / "x")], [tmp_path / "a.txt", "owner/name"]):
        with pytest.raises(FileNotFoundError, match="not found"):
            check_data(missing)
    with pytest.raises(FileNotFoundError, match="'missing.jsonl' not found"):
        load_text_dataset(["missing.jsonl"])  # not sent to the Hub


def test_activation_checkpointing_helper_uses_the_installed_name():
    import warnings

    from tests.hf.test_hub import tiny_nsa_model

    from nsa_hf.training import enable_activation_checkpointing

    model = tiny_nsa_model().train()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=FutureWarning)
        enable_activation_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    ids = torch.randint(0, 96, (1, 24))
    model(input_ids=ids, labels=ids).loss.backward()  # recomputes in the backward without error


def test_shared_training_flags_check_and_reach_training_arguments(tmp_path):
    """The flags the training scripts share: validated with the flag named, read into TrainingArguments."""
    import argparse

    from nsa_hf.training import add_training_flags, check_training_flags, training_arguments

    (tmp_path / "a.txt").write_text("x")
    parser = argparse.ArgumentParser()
    add_training_flags(parser)
    parser.add_argument("--max-steps", type=int, default=5)
    base = ["--model", "m", "--data", str(tmp_path / "a.txt")]
    args = parser.parse_args(base + ["--batch-size", "3", "--grad-accum", "2", "--logging-steps", "4",
                                     "--save-steps", "7", "--seed", "11"])
    check_training_flags(args, counts=("max_steps",))
    targs = training_arguments(args, str(tmp_path / "run"), max_steps=300, lr=5e-4)
    assert (targs.per_device_train_batch_size, targs.gradient_accumulation_steps, targs.logging_steps,
            targs.save_steps, targs.seed) == (3, 2, 4, 7, 11)
    assert targs.max_steps == 300 and targs.learning_rate == 5e-4 and targs.warmup_steps == 30
    assert targs.output_dir == str(tmp_path / "run") and not targs.bf16
    for extra, message in ((["--seq-len", "0"], "--seq-len 0: must be >= 1"),
                           (["--grad-accum", "-1"], "--grad-accum -1: must be >= 1"),
                           (["--max-steps", "0"], "--max-steps 0: must be >= 1")):
        with pytest.raises(ValueError, match=message):
            check_training_flags(parser.parse_args(base + extra), counts=("max_steps",))
    check_training_flags(parser.parse_args(base + ["--max-steps", "0"]))  # not a count unless named
    with pytest.raises(ValueError, match="--data: data file 'missing.txt' not found"):
        check_training_flags(parser.parse_args(["--model", "m", "--data", "missing.txt"]))
