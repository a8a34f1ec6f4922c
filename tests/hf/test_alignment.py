"""The selection alignment loss (nsa_hf.alignment) against a brute-force computation, and its hook into the
NSA models: packed documents, padding, the config option, gradients, gradient checkpointing."""
import math

import pytest
import torch

from nsa_hf.alignment import SelectionAlignment, selection_alignment_loss
from nsa_hf.training import enable_activation_checkpointing
from nsa_kernels import NSAParams, num_cmp_blocks
from tests.hf.test_hf_modeling import tiny_model

P = NSAParams(cmp_block=8, cmp_stride=4, slc_block=16, slc_count=4, init_blocks=1, local_blocks=2, window=24)
ALL_ROWS = 10_000  # more rows than any test sequence: every position with a choice is taken (deterministic)


def brute_force(q, k, cmp_k, q_pos, params, scale):
    """Loops over heads, rows, keys and blocks in float64: dense full attention, the compressed attention,
    the chunk counting of Eq. 9, the KL over the choosable blocks."""
    q, k, cmp_k = q.double(), k.double(), cmp_k.double()
    hq, hkv = q.shape[1], k.shape[1]
    group, terms = hq // hkv, []
    for r, t in enumerate(q_pos.tolist()):
        own = t // params.slc_block
        choosable = [j for j in range(own + 1) if params.init_blocks <= j <= own - params.local_blocks]
        if not choosable:
            continue
        for g in range(hkv):
            mass = {j: 0.0 for j in choosable}
            score = {j: 0.0 for j in choosable}
            for h in range(g * group, (g + 1) * group):
                full = torch.softmax(torch.stack([q[r, h] @ k[s, g] * scale for s in range(t + 1)]), 0)
                for s in range(t + 1):
                    if s // params.slc_block in mass:
                        mass[s // params.slc_block] += float(full[s])
                blocks = [i for i in range(cmp_k.shape[0]) if i * params.cmp_stride + params.cmp_block - 1 <= t]
                if not blocks:
                    continue
                p = torch.softmax(torch.stack([q[r, h] @ cmp_k[i, g] * scale for i in blocks]), 0)
                for i, pi in zip(blocks, p.tolist()):
                    for c in range(params.cmp_block // params.cmp_stride):
                        j = (i * params.cmp_stride + c * params.cmp_stride) // params.slc_block
                        if j in score:
                            score[j] += pi
            tm, ts = sum(mass.values()), sum(score.values())
            terms.append(sum(mass[j] / tm * (math.log(mass[j] / tm + 1e-12) - math.log(score[j] / ts + 1e-12))
                             for j in choosable))
    return sum(terms) / len(terms)


def test_loss_equals_brute_force():
    torch.manual_seed(0)
    t, hq, hkv, d = 90, 4, 2, 8
    k = torch.randn(t, hkv, d)
    cmp_k = torch.randn(num_cmp_blocks(t, P.cmp_block, P.cmp_stride), hkv, d)
    q_pos = torch.tensor([10, 47, 48, 60, 75, 89])  # the first two have no block to choose
    q = torch.randn(len(q_pos), hq, d)
    got = selection_alignment_loss(q, k, cmp_k, q_pos, P, d ** -0.5)
    assert float(got) == pytest.approx(brute_force(q, k, cmp_k, q_pos, P, d ** -0.5), rel=1e-4)
    assert selection_alignment_loss(q[:2], k, cmp_k, q_pos[:2], P, d ** -0.5) is None


def test_loss_is_zero_when_the_selection_matches_and_grows_otherwise():
    """q = 0 with constant keys: full attention and the compressed attention are both uniform, so the block
    mass and the block scores agree (each block's share is its number of keys) and the KL is 0; random keys
    and queries make it positive."""
    t, d = 96, 8
    q_pos = torch.tensor([64, 79, 95])
    q = torch.zeros(3, 2, d)
    k = torch.ones(t, 1, d)
    cmp_k = torch.ones(num_cmp_blocks(t, P.cmp_block, P.cmp_stride), 1, d)
    assert float(selection_alignment_loss(q, k, cmp_k, q_pos, P, 1.0)) == pytest.approx(0.0, abs=1e-6)
    q = torch.randn(3, 2, d)
    k = torch.randn(t, 1, d) * 3
    assert float(selection_alignment_loss(q, k, cmp_k, q_pos, P, 1.0)) > 1e-3


def _packed(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, 100, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return docs, torch.cat(docs)[None], torch.cat([torch.arange(n) for n in lengths])[None], cu


def _layer_losses(model, **inputs):
    with SelectionAlignment(model, rows=ALL_ROWS) as align:
        model(**inputs, use_cache=False)
    return torch.stack(align.losses).detach()


@pytest.mark.parametrize("how", ["cu_seq_lens", "position_ids"])
def test_packed_documents_do_not_mix(how):
    torch.manual_seed(0)
    model = tiny_model()
    lengths = [80, 70]
    docs, ids, positions, cu = _packed(lengths)
    kwargs = dict(position_ids=positions)
    if how == "cu_seq_lens":
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=80, max_length_k=80)
    packed = _layer_losses(model, input_ids=ids, **kwargs)
    alone = [_layer_losses(model, input_ids=doc[None]) for doc in docs]
    n = [(length - 48) for length in lengths]  # rows with a block to choose (the KV heads weigh both alike)
    assert torch.allclose(packed, (alone[0] * n[0] + alone[1] * n[1]) / sum(n), atol=1e-5)
    # a change in the second document leaves the first one's part unchanged
    docs2, ids2, _, _ = _packed(lengths, seed=1)
    ids2 = torch.cat([docs[0], docs2[1]])[None]
    other = _layer_losses(model, input_ids=docs2[1][None])
    assert torch.allclose(_layer_losses(model, input_ids=ids2, **kwargs), (alone[0] * n[0] + other * n[1]) / sum(n),
                          atol=1e-5)


def test_padded_batch_equals_separate_runs():
    torch.manual_seed(0)
    model = tiny_model()
    a, b = torch.randint(3, 100, (80,)), torch.randint(3, 100, (60,))
    ids = torch.zeros(2, 80, dtype=torch.long)
    mask = torch.zeros(2, 80, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 20:], mask[1, 20:] = b, 1  # left padding
    batch = _layer_losses(model, input_ids=ids, attention_mask=mask)
    la, lb = _layer_losses(model, input_ids=a[None]), _layer_losses(model, input_ids=b[None])
    assert torch.allclose(batch, (la * 32 + lb * 12) / 44, atol=1e-5)


def test_gradient_reaches_the_key_compressor_and_key_projection_only():
    torch.manual_seed(0)
    model = tiny_model().train()
    with SelectionAlignment(model, rows=16, seed=0) as align:
        model(torch.randint(3, 100, (2, 72)), use_cache=False)
    align.loss().backward()
    attn = model.model.layers[1].self_attn
    for p in attn.nsa_cmp_k.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert attn.k_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0  # the layers below, through the keys
    for mod in (attn.q_proj, attn.v_proj, attn.nsa_gate, attn.o_proj):
        assert mod.weight.grad is None or mod.weight.grad.abs().sum() == 0


def test_config_option_adds_weight_times_term_and_gradient_checkpointing_agrees():
    torch.manual_seed(0)
    model = tiny_model().train()
    ids = torch.randint(3, 100, (1, 90))
    plain = model(ids, labels=ids, use_cache=False).loss
    term = _layer_losses(model, input_ids=ids).mean()
    model.config.nsa_align_weight, model.config.nsa_align_rows = 0.5, ALL_ROWS
    with_term = model(ids, labels=ids, use_cache=False).loss
    assert float(with_term.detach()) == pytest.approx(float(plain.detach() + 0.5 * term), rel=1e-5)
    # a micro-batch of a larger batch (Trainer: num_items_in_batch): the term gets the micro-batch's share
    n = int((ids[..., 1:] != -100).sum())
    share = model(ids, labels=ids, use_cache=False, num_items_in_batch=torch.tensor(4 * n)).loss.detach()
    assert float(share) == pytest.approx(float(plain.detach() / 4 + 0.5 * term / 4), rel=1e-5)
    with_term.backward()
    grad = next(model.model.layers[1].self_attn.nsa_cmp_k.parameters()).grad.clone()
    model.zero_grad()
    enable_activation_checkpointing(model)
    again = model(ids, labels=ids, use_cache=False).loss
    again.backward()
    grad2 = next(model.model.layers[1].self_attn.nsa_cmp_k.parameters()).grad
    assert float(again.detach()) == pytest.approx(float(with_term.detach()), rel=1e-5)
    assert torch.allclose(grad2, grad, atol=1e-6)
    model.eval()  # not training: no term
    assert float(model(ids, labels=ids, use_cache=False).loss) == pytest.approx(float(plain.detach()), rel=1e-5)


def test_bf16_and_bad_settings():
    torch.manual_seed(0)
    model = tiny_model().to(torch.bfloat16).train()
    with SelectionAlignment(model, rows=8) as align:
        model(torch.randint(3, 100, (1, 70)), use_cache=False)
    loss = align.loss()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss > 0
    with pytest.raises(ValueError, match="rows=0"):
        SelectionAlignment(model, rows=0)
    model.config.nsa_align_weight = -1.0
    with pytest.raises(ValueError, match="nsa_align_weight=-1.0"):
        model(torch.randint(3, 100, (1, 70)), labels=torch.randint(3, 100, (1, 70)), use_cache=False)


def test_peft_lora_nsa_modules_get_the_term_gradient():
    from peft import get_peft_model

    from nsa_hf.lora import nsa_lora_config

    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_model(), nsa_lora_config(r=4)).train()
    ids = torch.randint(3, 100, (1, 80))
    with SelectionAlignment(peft_model, rows=16, seed=0) as align:
        peft_model(input_ids=ids, use_cache=False)
    assert len(align.losses) == peft_model.config.num_hidden_layers
    align.loss().backward()
    trained = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    cmp_k = [g for n, g in trained.items() if "nsa_cmp_k" in n and "modules_to_save" in n]
    assert cmp_k and all(g is not None and g.abs().sum() > 0 for g in cmp_k)
    k_lora = [g for n, g in trained.items() if "k_proj.lora_B" in n]
    assert k_lora and all(g is not None for g in k_lora)  # LoRA on the keys is in the graph (B starts at 0)
    base = peft_model.get_base_model()
    base.config.nsa_align_weight, base.config.nsa_align_rows = 2.0, ALL_ROWS
    with_term = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
    base.config.nsa_align_weight = 0.0
    plain = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
    assert float(with_term.detach()) > float(plain.detach())
