"""research/quality.py end to end in its --tiny CPU mode, and the pieces its claims rest on: the
window-only variant really is sliding-window attention, needles lie outside the window, batches are
the same for the dense and the NSA run."""
import json
import math

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from research import quality

    out = tmp_path_factory.mktemp("quality")
    results = quality.main(["--tiny", "--probe", "kv", "--out", str(out), "--needle-val-every", "2",
                            "--needle-keep-best"])
    return out, results


@pytest.fixture(scope="module")
def tiny_span_run(tmp_path_factory):
    from research import quality

    out = tmp_path_factory.mktemp("quality_span")
    results = quality.main(["--tiny", "--probe", "span", "--out", str(out), "--induction-steps", "3",
                            "--induction-len", "64", "--induction-span", "16", "--induction-batch-size", "4",
                            "--nsa-reference-needle", "--needle-loss", "lm", "--nsa-frozen-needle", "--grad-check",
                            "--nsa-needle-extra", "lm@2e-3,answer@2e-3,both@2e-3,answer_capped@2e-3,answer_align@2e-3",
                            "--nsa-slc-count-needle", "6", "--align-weight", "1000"])
    return out, results


def test_tiny_run_writes_results(tiny_run):
    out, results = tiny_run
    saved = json.loads((out / "results.json").read_text())
    assert "| NSA, converted + continued |" in (out / "results.md").read_text()
    for key in ("dense_pretrained", "nsa_converted", "dense_continued", "nsa_continued"):
        for part in ("all", "late_half"):
            assert math.isfinite(saved["loss"][key][part]) and 0 < saved["loss"][key][part] < 10
    # Training did something: continued models beat the pretrained one (same data, more steps).
    assert saved["loss"]["dense_continued"]["all"] < saved["loss"]["dense_pretrained"]["all"]
    assert saved["loss"]["nsa_continued"]["all"] < saved["loss"]["nsa_converted"]["all"]
    gaps = saved["gaps"]
    expect = (saved["loss"]["nsa_continued"]["all"] - saved["loss"]["dense_continued"]["all"]) / \
        saved["loss"]["dense_continued"]["all"]
    assert gaps["nsa_vs_dense_continued"] == pytest.approx(expect)
    assert saved["steps"] == {"pretrain_steps": 10, "continue_steps": 3, "needle_steps": 3}
    assert set(saved["pass"]) == {"loss_within_1pct", "nsa_needle_ge_95pct", "nsa_variants_ge_95pct",
                                  "window_only_needle_le_10pct"}
    needle = saved["needle"]
    assert needle["probe"] == "kv" and needle["digits"] == 3
    # the retrieval summary restates the per-depth results: pooled mean, worst depth, the 95 % verdict
    assert set(needle["summary"]) == set(needle["results"])
    for name, summary in needle["summary"].items():
        exact = {d: acc["exact"] for d, acc in needle["results"][name]["after"].items()}
        assert summary["pooled"] == pytest.approx(sum(exact.values()) / len(exact))
        assert summary["worst"] == pytest.approx(min(exact.values()))
        assert summary["every_depth_ge_95pct"] == (min(exact.values()) >= 0.95)
    assert "| exact match after the fine-tune, " in (out / "results.md").read_text()
    assert set(needle["results"]) == {"nsa", "window_only", "dense"}
    for variant in needle["results"].values():
        for when in ("before", "after"):
            assert set(variant[when]) == set(needle["geometry"])
            for acc in variant[when].values():
                assert 0.0 <= acc["exact"] <= acc["digit"] <= 1.0
    # Every planted key is further from the question than the window reaches.
    for geo in needle["geometry"].values():
        assert geo["outside_window"] and geo["distance"] >= saved["args"]["window"]
    assert "--pretrain-steps 10" in saved["reproduce"]
    # validation during every fine-tune (steps 0, 2 and the last, 3) and early stopping on it
    assert "--needle-val-every 2" in saved["reproduce"] and "--needle-keep-best" in saved["reproduce"]
    for variant in needle["results"].values():
        val = variant["finetune"]["validation"]
        assert val["probes_per_depth"] == 4 and [c["step"] for c in val["curve"]] == [0, 2, 3]
        assert all(len(c["exact"]) == len(needle["geometry"]) for c in val["curve"])
        key = lambda c: (min(c["exact"]), sum(c["exact"]) / len(c["exact"]))  # noqa: E731
        best = max(val["curve"], key=key)  # the first of equals, as the run keeps it
        assert variant["finetune"]["kept_step"] == best["step"]
    assert "| validation exact match at the worst depth, by fine-tune step | 0 | 2 | 3 | kept step |" in \
        (out / "results.md").read_text()


def test_window_only_variant_is_sliding_window_attention(tiny_run):
    _, results = tiny_run
    check = results["window_only_check"]
    assert "error" not in check, check
    assert check["gates"] == [0.0, 0.0, 1.0]
    assert check["max_abs_logit_diff"] < 1e-4 * max(1.0, check["logit_scale"])


def test_frozen_nsa_modules_train_only_the_llama_weights():
    """The --nsa-frozen-needle variant: a step moves the Llama weights, never a compressor or gate."""
    from nsa_hf.training import is_nsa_parameter
    from research import quality

    args = quality.parse_args(["--tiny"])
    nsa = quality.frozen_nsa_modules(quality.convert(quality.build_dense(args, 512, 0), args))
    before = {n: p.detach().clone() for n, p in nsa.named_parameters()}
    run = quality.Run(nsa, torch.float32, 1e-2, 2, args)
    ids = torch.randint(1, 512, (2, args.seq_len))
    run.step(quality.lm_loss(ids))
    moved = {n for n, p in nsa.named_parameters() if not torch.equal(p, before[n])}
    nsa_names = {n for n in before if is_nsa_parameter(n)}
    assert nsa_names and not moved & nsa_names
    assert {n for n in before if "q_proj" in n} <= moved
    with pytest.raises(ValueError, match="no NSA module"):
        quality.frozen_nsa_modules(quality.build_dense(args, 512, 0))


def test_window_only_differs_from_nsa_and_ignores_far_tokens():
    """On a fresh converted model: the window-only output at the last position does not change when a
    token outside the window changes, the NSA output does (cmp/slc see it); inside the window both do."""
    from research import quality

    args = quality.parse_args(["--tiny"])
    dense = quality.build_dense(args, 512, 0)
    nsa = quality.convert(dense, args)
    with torch.no_grad():  # non-trivial gates and compressors, as after training
        for layer in nsa.model.layers:
            layer.self_attn.nsa_gate.bias.normal_()
            layer.self_attn.nsa_cmp_k.down.weight.normal_(std=0.1)
    wo = quality.window_only(nsa)
    n, w, layers = args.seq_len, args.window, args.layers
    ids = torch.randint(1, 512, (1, n))
    far = ids.clone()
    far[0, n - 1 - layers * w - 5] = (far[0, n - 1 - layers * w - 5] + 1) % 512  # beyond the stacked windows
    near = ids.clone()
    near[0, n - 3] = (near[0, n - 3] + 1) % 512

    def last(model, x):
        model.eval()
        with torch.no_grad():
            return model(input_ids=x, use_cache=False).logits[0, -1]

    base = last(wo, ids)
    assert (last(wo, far) - base).abs().max() < 1e-6
    assert (last(wo, near) - base).abs().max() > 1e-3
    assert (last(nsa, far) - last(nsa, ids)).abs().max() > 1e-3
    assert not any("nsa_gate" in name for name, _ in wo.named_parameters())  # frozen: nothing to train
    assert any("nsa_gate" in name for name, _ in nsa.named_parameters())  # the original is untouched


def _tiny_tokenizer():
    from nsa_hf.sample_data import train_tokenizer

    return train_tokenizer(["x = 1\nprint(x)\n" * 200, "def f(a):\n    return a + 0123456789\n" * 50], 300)


def test_needles_layout_and_depth_check():
    from research import quality

    tok = _tiny_tokenizer()
    seq, digits, window, pairs = 160, 3, 16, 3
    needles = quality.Needles(tok, seq, digits, window, pairs)
    fillers = torch.randint(100, 200, (3, seq))
    depths = [0.0, 0.5, 1.0]
    ids, answers = needles.batch(fillers, depths, torch.Generator().manual_seed(0))
    assert ids.shape == (3, seq) and answers.shape == (3, pairs, digits)
    digit_ids, key_ids = set(needles.digit_ids.tolist()), set(needles.key_ids.tolist())
    nl, eq = tok("\n")["input_ids"], tok(" =")["input_ids"]
    assert len(nl) == 1 and len(eq) == 1
    q_len = 3 + digits
    for row, depth, ans in zip(ids, depths, answers):
        assert set(ans.reshape(-1).tolist()) <= digit_ids
        assert row[needles.answer_pos].tolist() == ans.reshape(-1).tolist()  # the answers end the sequence
        tail = row[seq - pairs * q_len :].view(pairs, q_len)
        keys = tail[:, 1].tolist()
        assert len(set(keys)) == pairs and set(keys) <= key_ids  # every key asked once
        assert (tail[:, 0] == nl[0]).all() and (tail[:, 2] == eq[0]).all()
        body = row[: seq - pairs * q_len].tolist()
        first_question = seq - pairs * q_len + 2  # predicts the target's first digit
        for j, key in enumerate(keys):
            s = body.index(key) - 1  # capital-letter tokens occur nowhere else in this filler
            assert body.count(key) == 1
            assert body[s : s + 3] == [nl[0], key, eq[0]] and body[s + 3 : s + 3 + digits] == ans[j].tolist()
            assert first_question - (s + 2 + digits) >= window  # outside the window of every question
            if j == 0:  # the target sits at the requested depth
                assert s == needles.start(depth)
                assert first_question - (s + 2 + digits) == needles.distance(depth)
    assert needles.distance(0.0) > needles.distance(1.0) >= window
    assert needles.distance(1.0) < window + needles.needle_len  # depth 1: as close as the window allows
    # the logits that score the target are those that predict its digits
    args = quality.parse_args(["--tiny"])
    model = quality.build_dense(args, len(tok), 0).eval()
    with torch.no_grad():
        full = model(input_ids=ids).logits
        target = needles.logits(model, ids, target_only=True)
        every = needles.logits(model, ids)
    pos = needles.answer_pos
    assert torch.allclose(target[:, 0], full[:, pos[:digits] - 1], atol=1e-5)
    assert torch.allclose(every.reshape(3, -1, full.shape[-1]), full[:, pos - 1], atol=1e-5)
    with pytest.raises(SystemExit):  # context shorter than 4 windows
        quality.parse_args(["--tiny", "--seq-len", "32"])
    with pytest.raises(ValueError):  # no room for the lines outside the window
        quality.Needles(tok, 64, digits, window, 4)


def test_batch_stream_is_deterministic_and_covers_epochs():
    from research import quality

    blocks = torch.arange(10 * 4).view(10, 4)
    a, b = quality.BatchStream(blocks, 3, seed=1), quality.BatchStream(blocks, 3, seed=1)
    assert all(torch.equal(a.batch(i), b.batch(i)) for i in (5, 0, 2))
    first_epoch = torch.cat([a.batch(i) for i in range(3)])[:, 0].tolist() + a.batch(3)[:1, 0].tolist()
    assert sorted(first_epoch) == list(range(0, 40, 4))  # each block once per epoch


def test_needle_mix_batches_are_shared_and_marked():
    from research import quality

    needles = quality.Needles(_tiny_tokenizer(), 128, 3, 16, 2)
    stream = quality.BatchStream(torch.randint(100, 200, (20, 128)), 8, seed=0)
    a = quality.lm_batch(stream, 3, needles, 0.25, seed=1)
    assert torch.equal(a, quality.lm_batch(stream, 3, needles, 0.25, seed=1))  # same for dense and NSA
    plain = stream.batch(3)
    assert torch.equal(a[2:], plain[2:]) and not torch.equal(a[:2], plain[:2])
    for row in a[:2]:  # the row ends with the questions and their digits, which also appear earlier
        assert set(row[needles.answer_pos].tolist()) <= set(needles.digit_ids.tolist())
        assert set(row[needles.answer_pos[0] - 2 : needles.answer_pos[0] - 1].tolist()) <= set(needles.key_ids.tolist())
    assert torch.equal(quality.lm_batch(stream, 3, needles, 0.0, seed=1), plain)


# ---------------------------------------------------------------------------------------------
# Span probe (repeated random passages)


def test_spans_layout_and_geometry():
    """The planted target passage is the cue + the answer, the cue directly precedes the answer at the
    end, every planted passage lies outside the window of the first answer position at every depth,
    and no span token is special."""
    from research import quality

    tok = _tiny_tokenizer()
    special = set(tok.all_special_ids)
    assert tok.eos_token_id in special
    seq, span_len, prefix, window, distractors = 160, 12, 4, 16, 3
    spans = quality.Spans(tok, seq, span_len, prefix, window, distractors)
    assert not special & set(spans.vocab_ids.tolist()) and len(spans.vocab_ids) == len(tok) - len(special)
    n_rows = 60
    depths = [0.0, 0.1, 0.3, 0.5, 0.7, 1.0] * (n_rows // 6)
    fillers = torch.full((n_rows, seq), -1)  # sentinel: every other id in the body was planted
    ids, answers = spans.batch(fillers, depths, torch.Generator().manual_seed(0))
    n_answer = span_len - prefix
    assert ids.shape == (n_rows, seq) and answers.shape == (n_rows, 1, n_answer)
    body_len = seq - span_len
    first_answer = body_len + prefix  # position of the first answer token
    assert spans.answer_pos.tolist() == list(range(first_answer, seq))
    for row, depth, ans in zip(ids, depths, answers[:, 0]):
        assert row[spans.answer_pos].tolist() == ans.tolist()  # the answer ends the sequence
        s = spans.start(depth)
        target = row[s : s + span_len]
        assert target[prefix:].tolist() == ans.tolist()  # planted passage and answer: the same ids
        assert row[body_len:first_answer].tolist() == target[:prefix].tolist()  # the cue precedes the answer
        planted = (row[:body_len] != -1).nonzero().view(-1)
        assert len(planted) == (1 + distractors) * span_len  # non-overlapping passages
        span_tokens = torch.cat([row[:body_len][planted], row[body_len:]])  # every passage, the cue, the answer
        assert (span_tokens >= 0).all() and (span_tokens < len(tok)).all()
        assert not special & set(span_tokens.tolist())  # no special token in any span
        # every planted token is outside the window of the first answer position (and so of every later one)
        assert (first_answer - 1) - planted.max().item() >= window
        assert (first_answer - 1) - (s + span_len - 1) == spans.distance(depth) >= window
        assert spans.outside_window(depth)
    assert spans.distance(0.0) > spans.distance(1.0) >= window
    assert spans.distance(1.0) == window  # depth 1: as close as the window allows
    # the scored logits are those that predict the answer tokens
    args = quality.parse_args(["--tiny"])
    model = quality.build_dense(args, len(tok), 0).eval()
    x = ids[:3].clamp(min=1)  # the -1 sentinels are no token ids
    with torch.no_grad():
        full = model(input_ids=x).logits
        got = spans.logits(model, x, target_only=True)
    assert got.shape == (3, 1, n_answer, len(tok))
    assert torch.allclose(got[:, 0], full[:, spans.answer_pos - 1], atol=1e-5)
    with pytest.raises(ValueError):  # no room for the passages outside the window
        quality.Spans(tok, 64, span_len, prefix, window, 4)
    with pytest.raises(ValueError):
        quality.Spans(tok, seq, span_len, span_len, window, 1)
    with pytest.raises(SystemExit):
        quality.parse_args(["--tiny", "--span-prefix", "12", "--span-len", "12"])


def test_score_answers_exact_and_per_token():
    from research import quality

    g = torch.Generator().manual_seed(0)
    vocab, n, a = 50, 3, 16
    answers = torch.randint(1, vocab, (n, a), generator=g)
    logits = torch.randn(n, a, vocab, generator=g)
    logits.scatter_(-1, answers[..., None], 100.0)  # the max on every right answer id
    assert quality.score_answers(logits, answers) == {"exact": 1.0, "token": 1.0}
    assert quality.score_answers(logits[:1], answers[:1]) == {"exact": 1.0, "token": 1.0}
    wrong = logits.clone()
    wrong[0, 5, (answers[0, 5] + 1) % vocab] = 1000.0  # one answer token of the first row wrong
    assert quality.score_answers(wrong[:1], answers[:1]) == {"exact": 0.0, "token": (a - 1) / a}
    assert quality.score_answers(wrong, answers) == pytest.approx({"exact": 2 / 3, "token": (n * a - 1) / (n * a)})
    assert quality.answer_hits(wrong, answers) == (2, n * a - 1)


class _Oracle(torch.nn.Module):
    """Logits that put the max on the next input token (what teacher-forced copying gets right)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float()
        return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits})()


def test_span_accuracy_of_an_oracle_and_a_blind_model():
    from research import quality

    tok = _tiny_tokenizer()
    spans = quality.Spans(tok, 160, 12, 4, 16, 3)
    blocks = torch.randint(1, len(tok), (5, 160))
    kw = dict(depths=[0.1, 0.9], count=6, batch_size=4, seed=0, device=torch.device("cpu"))
    acc = quality.needle_accuracy(_Oracle(len(tok)), spans, blocks, **kw)
    assert acc == {"0.1": {"exact": 1.0, "token": 1.0}, "0.9": {"exact": 1.0, "token": 1.0}}

    class Blind(_Oracle):  # predicts token 0 (EOS, never in a span) everywhere
        def forward(self, input_ids, use_cache=False, logits_to_keep=0):
            return super().forward(torch.zeros_like(input_ids), use_cache, logits_to_keep)

    acc = quality.needle_accuracy(Blind(len(tok)), spans, blocks, **kw)
    assert acc == {"0.1": {"exact": 0.0, "token": 0.0}, "0.9": {"exact": 0.0, "token": 0.0}}


def test_span_mix_batches_carry_the_repeat():
    from research import quality

    spans = quality.Spans(_tiny_tokenizer(), 128, 12, 4, 16, 2)
    stream = quality.BatchStream(torch.randint(100, 200, (20, 128)), 8, seed=0)
    a = quality.lm_batch(stream, 3, spans, 0.25, seed=1)
    assert torch.equal(a, quality.lm_batch(stream, 3, spans, 0.25, seed=1))  # same for dense and NSA
    plain = stream.batch(3)
    assert torch.equal(a[2:], plain[2:])
    for row in a[:2]:  # ends with a passage that also occurs earlier
        tail = row[-12:].tolist()
        body = row[:-12].tolist()
        assert any(body[i : i + 12] == tail for i in range(len(body) - 11))


def test_tiny_span_run_writes_span_metrics(tiny_span_run):
    out, _ = tiny_span_run
    saved = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    assert "span probe: exact match" in table and "span probe: per-token accuracy" in table
    needle = saved["needle"]
    assert needle["probe"] == "span" and saved["args"]["probe"] == "span"
    assert needle["span_len"] == 12 and needle["span_prefix"] == 4 and needle["answer_tokens"] == 8
    assert needle["distractors"] == 2 and 0 < needle["chance_per_token"] < 0.01
    extra = {"nsa_lm_lr0.002", "nsa_answer_lr0.002", "nsa_both_lr0.002", "nsa_answer_capped_lr0.002",
             "nsa_answer_align_lr0.002", "nsa_slc6"}
    assert set(needle["results"]) == {"nsa", "nsa_reference", "nsa_frozen_modules", "window_only", "dense"} | extra
    # the variants the targets need run first, the slow reference last (a run cut short keeps the former)
    order = list(needle["results"])
    assert order[:3] == ["nsa", "window_only", "dense"] and order[-1] == "nsa_reference", order
    # Every extra variant starts from the continued NSA model and sees the same batches: the one with the
    # main settings (lm loss, default LR 2e-3) repeats the main fine-tune; "both" = lm + answer at step 1.
    res = needle["results"]
    assert res["nsa_lm_lr0.002"]["finetune"]["last_losses"] == pytest.approx(res["nsa"]["finetune"]["last_losses"],
                                                                             rel=1e-5)
    assert (res["nsa"]["loss"], res["nsa_answer_lr0.002"]["loss"], res["nsa_both_lr0.002"]["lr"]) == ("lm", "answer",
                                                                                                       2e-3)
    first = lambda v: res[v]["finetune"]["first_losses"][0]  # noqa: E731
    assert first("nsa_both_lr0.002") == pytest.approx(first("nsa") + first("nsa_answer_lr0.002"), rel=1e-5)
    assert first("nsa_answer_lr0.002") != pytest.approx(first("nsa"), rel=1e-3)
    assert "NSA, both loss, LR 0.002, after fine-tune" in table
    # the capped answer loss never exceeds its cap (2 nats by default) and records it
    capped = res["nsa_answer_capped_lr0.002"]
    assert capped["answer_loss_cap"] == 2.0 and max(capped["finetune"]["first_losses"]) <= 2.0 + 1e-6
    # the aligned loss adds a positive KL (x 1000: the tiny model's attention is near uniform, KL ~1e-6) to
    # the same first step's answer loss, and records its weight
    aligned = res["nsa_answer_align_lr0.002"]
    assert aligned["align_weight"] == 1000.0
    assert first("nsa_answer_lr0.002") + 1e-5 < first("nsa_answer_align_lr0.002") < first("nsa_answer_lr0.002") + 1.0
    # the selection diagnostic: for the NSA variants only, a fraction per layer and the right/wrong split
    for variant, r in res.items():
        cov = r["after"]["0.5"].get("selection")
        assert (cov is not None) == variant.startswith("nsa"), variant
        if cov:
            assert len(cov["per_layer"]) == 2 and cov["tokens"] == 4 * 8
            assert all(0.0 <= x <= 1.0 for x in cov["per_layer"]) and cov["any_layer"] >= max(cov["per_layer"]) - 1e-4
            best, best_missed = cov["best_layer"], round(cov["tokens"] * (1 - cov["per_layer"][cov["best_layer"]]))
            assert cov["per_layer_missed"][best] == best_missed
            assert 0 <= cov["per_layer_missed_wrong"][best] <= best_missed
            # every wrong token is classified once; gates per layer and head (4 heads) at right / wrong tokens
            after = r["after"]["0.5"]
            assert sum(after["errors"].values()) == cov["wrong_tokens"]
            for split in ("right", "wrong"):
                if after["gates"][split] is not None:
                    assert len(after["gates"][split]) == 2 and len(after["gates"][split][0]) == 4
                    assert all(0.0 <= x <= 1.0 for layer in after["gates"][split] for head in layer for x in head)
    assert "selection per layer: answer tokens whose source block the layer did not choose" in table
    assert "wrong answer tokens by what was predicted" in table
    assert "| NSA, before fine-tune, depth 0.5 |" in table
    assert "NSA, 6 selected blocks, after fine-tune" in table and "--nsa-slc-count-needle 6" in saved["reproduce"]
    # More selected blocks see more of the context: a different first fine-tune loss than the main variant.
    assert first("nsa_slc6") != pytest.approx(first("nsa"), rel=1e-6)
    assert "--nsa-needle-extra lm@2e-3,answer@2e-3,both@2e-3,answer_capped@2e-3" in saved["reproduce"]
    # On CPU "auto" is the reference too: the reference-backend variant repeats the NSA fine-tune (in
    # micro-batches of 2 of the 4 sequences: the accumulated steps match the whole-batch ones), and the
    # backend is restored afterwards.
    from nsa_hf.backends import varlen_backend

    assert varlen_backend(None) == "auto"
    ft = {v: needle["results"][v]["finetune"] for v in ("nsa", "nsa_reference", "nsa_frozen_modules")}
    assert ft["nsa_reference"]["first_losses"] == pytest.approx(ft["nsa"]["first_losses"], rel=1e-5)
    assert ft["nsa_reference"]["last_losses"] == pytest.approx(ft["nsa"]["last_losses"], rel=1e-4)
    # Same first batch and weights; frozen modules change the later steps only.
    assert ft["nsa_frozen_modules"]["first_losses"][0] == pytest.approx(ft["nsa"]["first_losses"][0], rel=1e-6)
    assert "NSA, reference backend, after fine-tune" in table
    assert "NSA, compressors and gates frozen, after fine-tune" in table
    # The gradient check (Triton interpreter vs reference, fp32 on CPU) agrees; all groups have gradients.
    gc = saved["grad_check"]
    for loss_name in ("answer", "lm"):
        res = gc[loss_name]
        assert res["loss"]["triton"] == pytest.approx(res["loss"]["reference_fp32"], rel=1e-4)
        for group in ("nsa_modules", "attention", "mlp", "embeddings_norms", "all"):
            assert res["triton_vs_reference_fp32"][group]["cosine"] > 0.9999, (loss_name, group, res)
            assert res["triton_vs_reference_fp32"][group]["norm_truth"] > 0
        assert "missing" not in res["triton_vs_reference_fp32"]
    assert "gradient check (2 sequences)" in table
    assert "--nsa-reference-needle" in saved["reproduce"] and "--needle-loss lm" in saved["reproduce"]
    for variant in needle["results"].values():
        for when in ("before", "after"):
            assert set(variant[when]) == set(needle["geometry"])
            for acc in variant[when].values():
                assert set(acc) - {"selection", "gates", "errors"} == {"exact", "token"}
                assert 0.0 <= acc["exact"] <= acc["token"] <= 1.0
        assert variant["finetune"]["steps"] == 3
    for depth, geo in needle["geometry"].items():
        assert geo["outside_window"] and geo["distance"] >= saved["args"]["window"]
        assert geo["outside_stacked_windows"] == (geo["distance"] >= needle["stacked_window_reach"])
        assert (depth in needle["outside_stacked_windows"]) == geo["outside_stacked_windows"]
    assert "error" not in saved["window_only_check"], saved["window_only_check"]
    assert "--probe span" in saved["reproduce"] and "--span-len 12" in saved["reproduce"]
    warmup = saved["training"]["dense_induction"]
    assert warmup["steps"] == 3
    probe = saved["copy_probe"]
    assert probe["repeats"] == 1 and probe["bins"] == ["0-16", "16-32", "32-64"]
    assert set(probe["accuracy"]) == {"dense_after_warmup", "dense_pretrained", "nsa_converted", "nsa_continued",
                                      "window_only_continued", "dense_continued"}
    for acc in probe["accuracy"].values():
        assert 0.0 <= acc["all"] <= 1.0 and set(acc) == {"all", *probe["bins"]}
    assert "| copy accuracy" in (out / "results.md").read_text()
    assert "--induction-steps 3" in saved["reproduce"]


def test_induction_batches_repeat_a_span_at_varied_offsets():
    from research import quality

    vocab = torch.arange(5, 300)
    g = torch.Generator().manual_seed(0)
    ids, mask, distance = quality.induction_batch(vocab, 64, 96, 16, g)
    assert ids.shape == mask.shape == distance.shape == (64, 96) and bool(((ids >= 5) & (ids < 300)).all())
    assert bool((distance[mask] >= 16).all()) and bool((distance[~mask] == 0).all())
    offsets = set()
    for row, m in zip(ids, mask):
        pos = torch.nonzero(m).flatten().tolist()
        assert len(pos) == 15 and pos == list(range(pos[0], pos[0] + 15))
        q = pos[0] - 1  # start of the repeat; its source is an earlier, non-overlapping copy
        tail = row[q:q + 16].tolist()
        sources = [p for p in range(0, q - 15) if row[p:p + 16].tolist() == tail]
        assert sources, "the repeated span must occur earlier"
        offsets.add(q - sources[0])
    assert len(offsets) > 10  # not one fixed offset (which a positional head could solve)

    class Oracle(torch.nn.Module):  # predicts every next token: copy accuracy 1
        def forward(self, input_ids, use_cache=False):
            logits = torch.full((*input_ids.shape, 300), -1.0)
            logits[:, :-1].scatter_(2, input_ids[:, 1:, None], 1.0)
            return type("Out", (), {"logits": logits})()

    hits = quality.copy_hits(Oracle(), ids, mask)
    assert hits.shape == (int(mask[:, 1:].sum()),) and bool(hits.all())  # copy accuracy 1
    with pytest.raises(SystemExit):
        quality.parse_args(["--tiny", "--induction-span", "60", "--induction-len", "64"])


def test_induction_batches_with_several_repeats_and_the_copy_probe():
    from research import quality

    vocab = torch.arange(5, 300)
    g = torch.Generator().manual_seed(1)
    ids, mask, distance = quality.induction_batch(vocab, 32, 256, 16, g, repeats=4)
    assert bool((mask.sum(1) == 4 * 15).all())  # 4 repeats, non-overlapping, one per 64-token segment
    for row, m, dist in zip(ids, mask, distance):
        for pos in torch.nonzero(m).flatten().tolist():
            assert row[pos] == row[pos - dist[pos]]  # every supervised token repeats the one `distance` back
        starts = [p - 1 for p in torch.nonzero(m).flatten().tolist() if not m[p - 1]]
        assert [s // 64 for s in starts] == [0, 1, 2, 3]
    assert int(distance.max()) > 128 and int(distance[mask].min()) >= 16  # far copies as well as near ones
    with pytest.raises(ValueError, match="5 repeats of 16 tokens"):
        quality.induction_batch(vocab, 1, 128, 16, g, repeats=5)
    with pytest.raises(SystemExit):
        quality.parse_args(["--tiny", "--induction-len", "64", "--induction-span", "16", "--induction-repeats", "3"])
    assert quality.parse_args(["--tiny", "--induction-len", "256", "--induction-span", "16"]).induction_repeats == 4

    probe = quality.CopyProbe(vocab, 8, 256, 16, 4, window=32, seed=0)
    assert probe.bins() == [(0, 32), (32, 64), (64, 128), (128, 256)]

    class Oracle(torch.nn.Module):  # right exactly where the copy distance is below 64
        def forward(self, input_ids, use_cache=False):
            logits = torch.zeros(*input_ids.shape, 300)
            logits[:, :-1].scatter_(2, input_ids[:, 1:, None], 1.0)
            near = (probe.distance[:len(input_ids)] < 64)[:, 1:]
            wrong = torch.zeros(300)
            wrong[0] = 2.0  # id 0 is never drawn
            logits[:, :-1][~near] = wrong
            return type("Out", (), {"logits": logits})()

    acc = quality.CopyProbe.accuracy(probe, Oracle(), "cpu", batch_size=8)
    assert acc["0-32"] == acc["32-64"] == 1.0
    assert acc["64-128"] == acc["128-256"] == 0.0 and 0.0 < acc["all"] < 1.0


def test_warmup_only_curriculum_stops_after_the_copy_probe(tmp_path):
    from research import quality

    results = quality.main(["--tiny", "--out", str(tmp_path), "--induction-span", "16",
                            "--induction-curriculum", "16:64:3,0:128:2", "--warmup-only"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert "loss" not in saved and "needle" not in saved and results["copy_probe"] == saved["copy_probe"]
    warmup = saved["training"]["dense_induction"]
    assert warmup["steps"] == 5
    assert [(st["vocab"], st["length"], st["steps"], st["batch"], st["repeats"]) for st in warmup["stages"]] == \
        [(16, 64, 3, 4, 1), (0, 128, 2, 2, 2)]  # tokens per step constant: 2 x 128 (tiny batch x seq-len)
    assert set(saved["copy_probe"]["accuracy"]) == {"dense_after_stage_1", "dense_after_warmup"}
    assert "--induction-curriculum 16:64:3,0:128:2" in saved["reproduce"] and "--warmup-only" in saved["reproduce"]
    for bad in (["--induction-curriculum", "16:64"], ["--induction-curriculum", "16:20:3"],
                ["--induction-curriculum", "16:64:3", "--induction-steps", "2"], ["--warmup-only"]):
        with pytest.raises(SystemExit):
            quality.parse_args(["--tiny", "--induction-span", "16", *bad])


def test_copy_check_script_runs_and_builds_copies():
    from research import copy_check

    g = torch.Generator().manual_seed(0)
    for task in copy_check.TASKS:
        ids, mask = copy_check.make_batch(task, 4, g)
        span = copy_check.TASKS[task]["span"]
        assert int(mask.sum()) == 4 * (span - 1)
    out = copy_check.main(["--task", "varied", "--steps", "2", "--batch", "2", "--log-every", "1"])
    assert len(out["history"]) == 2 and set(out["transfer"]) == {100, 400, 800}
    assert all(0.0 <= v <= 1.0 for v in out["transfer"].values())


def test_nsa_finetune_check_script_runs(tmp_path):
    from research import nsa_finetune_check

    res = nsa_finetune_check.main(["--out", str(tmp_path), "--warmup-steps", "2", "--finetune-steps", "2",
                                   "--batch", "2", "--threads", "1"])
    assert set(res["finetune"]) == {"nsa", "dense"} and (tmp_path / "dense_warmup.pt").exists()
    for variant in res["finetune"].values():
        assert 0.0 <= variant["before"]["all"] <= 1.0 and 0.0 <= variant["after"]["all"] <= 1.0
    ids, far = nsa_finetune_check.far_copy_batch(torch.arange(1, 129), 4, 16, step=0)
    assert bool((far.sum(1) == 16).all())  # the last 16 far copies of each row
    ids, far_all = nsa_finetune_check.far_copy_batch(torch.arange(1, 129), 4, 0, step=0)
    assert bool((far_all.sum(1) >= 16).all()) and bool((far <= far_all).all())
    with pytest.raises(SystemExit):
        nsa_finetune_check.parse_args(["--answers-per-row", "-1"])


@pytest.mark.parametrize("spec", ["lm", "lm@", "lm@-1", "dense@1e-3", "answer@x"])
def test_needle_variant_spec_errors_name_the_item(spec):
    from research import quality

    with pytest.raises(SystemExit):
        quality.parse_args(["--nsa-needle-extra", spec])
    with pytest.raises(ValueError, match=f"item {spec!r}"):
        quality.parse_needle_variants(spec)


def test_needle_variant_spec_parses():
    from research import quality

    assert quality.parse_needle_variants("lm@5e-4, answer@1e-4") == [("lm", 5e-4), ("answer", 1e-4)]
    assert quality.parse_needle_variants(None) == []
    assert quality.needle_variant_name("both", 5e-4) == "nsa_both_lr0.0005"


def test_with_slc_count_selects_more_blocks_and_checks_the_count():
    from research import quality
    from nsa_hf import NSALlamaConfig, NSALlamaForCausalLM

    torch.manual_seed(0)
    config = NSALlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, nsa_cmp_block=8, nsa_cmp_stride=4,
                            nsa_slc_block=8, nsa_slc_count=3, nsa_init_blocks=1, nsa_local_blocks=1, nsa_window=8)
    model = NSALlamaForCausalLM(config).eval()
    wide = quality.with_slc_count(model, 6)
    assert (model.config.nsa_slc_count, wide.config.nsa_slc_count) == (3, 6)
    ids = torch.randint(0, 64, (1, 80))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, wide(ids).logits)
    with pytest.raises(ValueError, match="slc_count"):
        quality.with_slc_count(model, 1)  # fewer than the forced initial + local blocks


def test_capped_answer_loss_drops_the_gradient_of_tokens_above_the_cap():
    """answer_capped: a token whose cross-entropy is above the cap adds no gradient; below it, the gradient is
    the plain answer loss's (both are means over the same tokens)."""
    from research import quality

    class OneQuestion:  # the probe interface needle_loss uses: logits (B, 1, A, V) of the answer tokens
        def __init__(self, logits):
            self.value = logits

        def logits(self, model, ids):
            return self.value

    vocab = 11
    logits = torch.zeros(1, 1, 2, vocab)
    logits[0, 0, 0, 3] = 8.0  # token 0: answer 3 is likely (small loss); token 1: answer 5 is not (large loss)
    logits[0, 0, 1, 2] = 8.0
    answers = torch.tensor([[[3, 5]]])
    grads = {}
    for cap in (None, 2.0):
        leaf = logits.clone().requires_grad_(True)
        quality.needle_loss(OneQuestion(leaf), None, answers, cap=cap)(None).backward()
        grads[cap] = leaf.grad[0, 0]
    plain, capped = grads[None], grads[2.0]
    assert plain[1].abs().sum() > 0.1 and capped[1].abs().sum() == 0  # the hopeless token: no gradient
    assert torch.allclose(capped[0], plain[0])  # the other token: unchanged
    step = quality.needle_step_loss(OneQuestion(logits), torch.zeros(1, 4), answers, "answer_capped", cap=2.0)
    assert step(None).item() == pytest.approx(
        (torch.nn.functional.cross_entropy(logits[0, 0], answers[0, 0], reduction="none").clamp(max=2.0)).mean().item())
    assert quality.parse_needle_variants("answer_capped@1e-4") == [("answer_capped", 1e-4)]


def test_run_restore_brings_back_master_and_working_copy():
    """Run.snapshot / restore (early stopping): after steps, restore gives back the snapshot's float32 master
    weights and a working copy in the run's dtype equal to them."""
    from research import quality

    args = quality.parse_args(["--tiny"])
    run = quality.Run(quality.build_dense(args, 512, 0), torch.bfloat16, 1e-2, 3, args)
    ids = torch.randint(1, 512, (2, 32))
    run.step(quality.lm_loss(ids))
    saved = run.snapshot()
    run.step(quality.lm_loss(ids))
    assert not all(torch.equal(a, mp) for a, (mp, _) in zip(saved, run.pairs))
    run.restore(saved)
    for a, (mp, wp) in zip(saved, run.pairs):
        assert mp.dtype == torch.float32 and wp.dtype == torch.bfloat16
        assert torch.equal(mp, a) and torch.equal(wp, a.to(torch.bfloat16))


def test_keep_best_needs_validation():
    from research import quality

    with pytest.raises(SystemExit):
        quality.parse_args(["--needle-keep-best"])
    with pytest.raises(SystemExit):
        quality.parse_args(["--needle-val-every", "-1"])


def test_align_weight_must_not_be_negative(capsys):
    from research import quality

    with pytest.raises(SystemExit):
        quality.parse_args(["--align-weight", "-0.5"])
    assert "--align-weight -0.5: must be >= 0" in capsys.readouterr().err
    assert quality.parse_args(["--align-weight", "0"]).align_weight == 0.0


def test_window_only_control_drops_only_the_alignment_term():
    from research import quality

    # the control's selection is switched off (gates 0, 0, 1): nothing to align, the answer loss stays
    assert quality.window_only_needle_loss("answer_align") == "answer"
    for kind in ("answer", "lm", "both", "answer_capped"):
        assert quality.window_only_needle_loss(kind) == kind
    with pytest.raises(ValueError, match="'align'"):
        quality.window_only_needle_loss("align")


def test_wilson_interval():
    from research.quality import wilson_interval

    low, high = wilson_interval(121, 128)
    assert low == pytest.approx(0.8914, abs=1e-4) and high == pytest.approx(0.9733, abs=1e-4)
    assert low < 121 / 128 < high
    # mirror image: k of n successes is n - k failures
    low2, high2 = wilson_interval(7, 128)
    assert low2 == pytest.approx(1 - high) and high2 == pytest.approx(1 - low)
    assert wilson_interval(0, 128)[0] == 0.0 and 0.02 < wilson_interval(0, 128)[1] < 0.04
    # more probes, narrower interval around the same rate
    assert wilson_interval(242, 256)[1] - wilson_interval(242, 256)[0] < high - low
    for hits, count in ((5, 4), (-1, 4), (0, 0)):
        with pytest.raises(ValueError, match=f"hits={hits}, count={count}"):
            wilson_interval(hits, count)


def test_retrieval_summary():
    from research.quality import retrieval_summary

    summary = retrieval_summary({"0.1": 126 / 128, "0.3": 127 / 128, "0.5": 121 / 128, "0.7": 125 / 128}, 128)
    assert summary["pooled"] == pytest.approx(499 / 512)
    assert summary["worst_depth"] == "0.5" and summary["worst"] == pytest.approx(121 / 128)
    assert not summary["every_depth_ge_95pct"]
    assert retrieval_summary({"0.1": 122 / 128, "0.5": 1.0}, 128)["every_depth_ge_95pct"]
