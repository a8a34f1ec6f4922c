"""Every NSA checkpoint that save_pretrained / push_to_hub writes loads as remote code where nsa-hf is
not installed, with the same logits; remote_code=False writes none. The helper
:func:`assert_loads_without_nsa_hf` is shared with the tests of the example scripts that write folders."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import nsa_hf  # noqa: F401  (registers NSA-Llama for auto classes)
from nsa_hf import NSALlamaConfig, NSALlamaForCausalLM
from nsa_hf.remote_code import BUNDLED_KERNEL_MODULES, bundle_remote_code, has_remote_code

# A Python started with this folder first on its path cannot import nsa_hf or nsa_kernels, although
# both are installed (editable) in the environment: as on a machine without nsa-hf.
_BLOCKER = '''
import sys

class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("nsa_hf", "nsa_kernels"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: nsa-hf is not installed here)")
        return None

sys.meta_path.insert(0, _Blocked())
'''

_LOAD = '''
import os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
for name in ("nsa_hf", "nsa_kernels"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable: the check would not test remote code")
folder, ids, out = sys.argv[1], torch.load(sys.argv[2]), sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
assert model.config._attn_implementation == "nsa", model.config._attn_implementation
results = {}
with torch.no_grad():
    results["logits"] = model(input_ids=ids, use_cache=False).logits
if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):  # the card's snippet: no prompt, loads
    results["tokens"] = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)("def f(x):")["input_ids"]
# Saved again from remote code (no nsa-hf), the checkpoint still loads as remote code.
again = os.path.join(os.path.dirname(out), "saved-from-remote-code")
model.save_pretrained(again)
with torch.no_grad():
    results["logits_again"] = AutoModelForCausalLM.from_pretrained(again, trust_remote_code=True)(
        input_ids=ids, use_cache=False).logits
torch.save(results, out)
'''


def assert_loads_without_nsa_hf(folder, tmp_path, model=None, tokenizer=None, length: int = 70) -> None:
    """``folder`` loads with ``trust_remote_code=True`` in a Python that cannot import nsa_hf or
    nsa_kernels and gives the logits of ``model`` (default: ``folder`` loaded with nsa-hf) on random ids;
    its tokenizer (if any) loads with ``trust_remote_code=True`` and tokenises like ``tokenizer``; saved
    again there, it loads again with the same logits."""
    from transformers import AutoModelForCausalLM

    work = Path(tmp_path) / "remote-load"
    work.mkdir(parents=True, exist_ok=True)
    (work / "sitecustomize.py").write_text(_BLOCKER)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    torch.save(ids, work / "ids.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_MODULES"))}
    env.update(PYTHONPATH=str(work), HF_MODULES_CACHE=str(work / "modules"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(_LOAD), str(folder), str(work / "ids.pt"),
                          str(work / "out.pt")], capture_output=True, text=True, timeout=600, cwd=work, env=env,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(work / "out.pt")
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got["logits"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["logits_again"], want, rtol=1e-5, atol=1e-5)
    if tokenizer is not None:
        assert got["tokens"] == tokenizer("def f(x):")["input_ids"]


def tiny_nsa_model(seed: int = 0) -> NSALlamaForCausalLM:
    """A tiny NSA-Llama with random (non-initial) NSA weights, so that every branch shows in the logits."""
    torch.manual_seed(seed)
    config = NSALlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, nsa_cmp_block=8, nsa_cmp_stride=4,
        nsa_slc_block=8, nsa_slc_count=4, nsa_window=16, bos_token_id=0, eos_token_id=0,
    )
    model = NSALlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "nsa_" in name:
                p.normal_(std=0.2)
    return model


def _saved_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_save_pretrained_loads_as_remote_code_without_nsa_hf(tmp_path):
    model = tiny_nsa_model()
    model.save_pretrained(tmp_path / "ckpt")
    files = _saved_files(tmp_path / "ckpt")
    assert {"modeling_nsa_llama.py", "configuration_nsa_llama.py", "nsa_bundle.py"} <= files
    assert {f"{m}.py" for m in BUNDLED_KERNEL_MODULES} <= files
    assert has_remote_code(tmp_path / "ckpt")
    assert_loads_without_nsa_hf(tmp_path / "ckpt", tmp_path, model)


def test_bundling_twice_is_bundling_once(tmp_path):
    model = tiny_nsa_model()
    model.save_pretrained(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").glob("*.py")}
    bundle_remote_code(tmp_path / "ckpt")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").glob("*.py")} == before
    assert "try:\n    try:" not in "".join(v.decode() for v in before.values())


def test_save_pretrained_without_remote_code(tmp_path):
    model = tiny_nsa_model()
    model.save_pretrained(tmp_path / "with")  # sets config.auto_map in memory
    model.save_pretrained(tmp_path / "plain", remote_code=False)
    assert not list((tmp_path / "plain").glob("*.py"))
    assert "auto_map" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert not has_remote_code(tmp_path / "plain")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()  # with nsa-hf: loads
    ids = torch.randint(0, 96, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    # The model is left as it was: the next save writes remote code again.
    model.save_pretrained(tmp_path / "again")
    assert has_remote_code(tmp_path / "again") and (tmp_path / "again" / "nsa_bundle.py").is_file()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """push_to_hub without a network: the upload copies the folder being uploaded to ``tmp_path/hub``."""
    import shutil

    import transformers.modeling_utils as modeling_utils
    import transformers.utils.hub as hub

    uploads = tmp_path / "hub"

    class Repo:
        def __init__(self, repo_id):
            self.repo_id = repo_id

    class Api:
        def create_repo(self, repo_id, **kwargs):
            return Repo(repo_id)

    class Card:
        def save(self, path):
            Path(path).write_text("card\n")

    def upload(self, working_dir, repo_id, *args, **kwargs):
        shutil.copytree(working_dir, uploads / repo_id.replace("/", "--"))
        return "uploaded"

    for module in (hub, modeling_utils):
        monkeypatch.setattr(module, "hf_api", lambda: Api(), raising=False)
        monkeypatch.setattr(module, "create_and_tag_model_card", lambda *a, **k: Card(), raising=False)
    monkeypatch.setattr(hub.PushToHubMixin, "_upload_modified_files", upload)
    return uploads


def test_push_to_hub_uploads_a_folder_that_loads_without_nsa_hf(fake_hub, tmp_path):
    model = tiny_nsa_model(seed=1)
    model.push_to_hub("someone/nsa-tiny")
    pushed = fake_hub / "someone--nsa-tiny"
    assert (pushed / "nsa_bundle.py").is_file()
    assert_loads_without_nsa_hf(pushed, tmp_path / "a", model)
    # save_pretrained(push_to_hub=True) uploads from inside save_pretrained: bundled before that too.
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="someone/nsa-tiny-2")
    pushed = fake_hub / "someone--nsa-tiny-2"
    assert (pushed / "nsa_bundle.py").is_file() and "try:" in (pushed / "attention.py").read_text()
