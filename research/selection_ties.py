"""Near-ties of block selection behind two GPU test failures, measured on the CPU.

NSA takes each query's top-n blocks by score; where two blocks' scores are closer than the rounding error
of a computation, two correct implementations may choose differently, and the step's output moves by a
whole block's worth. This harness replays the two tests' exact inputs on the CPU and reports the margins.

* ``decode``: ``tests/hf/test_hf_decode_kernels.py::test_cuda_auto_uses_decode_kernels_and_matches_varlen``
  (fp32). Its token ids are drawn on the GPU (``torch.randint(..., device="cuda")`` after the per-test seed
  of ``conftest.py``); :func:`cuda_randint` replays that draw on the CPU (Philox4x32-10, as cuRAND). Prints
  the smallest selection margins per row and layer (float64 reference) and the logit change at the
  tightest one when the runner-up block is taken instead.
* ``family``: ``tests/hf/test_convert.py::test_each_family_in_bfloat16_on_cuda``: the bf16 reference
  against the float32 reference of the same weights; the tokens outside the test's tolerance and every
  block choice bf16 flips, with its float64 margin.

* ``decode-choices``: that test's teacher-forced steps through the decode kernels (on the GPU, or the
  interpreter on the CPU, slow); every block choice that differs from the float64 reference, with its
  margin: on the GPU it tells how close a tie the kernels' rounding can flip.

    python -m research.selection_ties decode
    python -m research.selection_ties decode-choices --device cuda
    python -m research.selection_ties family --family mistral
"""
from __future__ import annotations

import argparse
import copy
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # decode-choices on the CPU: the kernels in the interpreter

MASK32 = 0xFFFFFFFF
DECODE_TEST = "tests/hf/test_hf_decode_kernels.py::test_cuda_auto_uses_decode_kernels_and_matches_varlen[dtype0-0.002]"


def philox4x32_10(counter: list[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32-10 (Salmon et al. 2011) on int64 tensors holding uint32 values: the four output words."""
    c = list(counter)
    k0, k1 = key
    for _ in range(10):
        p0, p1 = c[0] * 0xD2511F53, c[2] * 0xCD9E8D57  # < 2^64: exact in uint64, may wrap in int64
        hi0, lo0 = _hi32(p0), p0 & MASK32
        hi1, lo1 = _hi32(p1), p1 & MASK32
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
    return c


def _hi32(p: torch.Tensor) -> torch.Tensor:
    return (p >> 32) & MASK32  # arithmetic shift of a wrapped int64, then the low 32 bits: the true high word


def cuda_randint(seed: int, low: int, high: int, shape: tuple[int, ...]) -> torch.Tensor:
    """What ``torch.randint(low, high, shape, device="cuda")`` returns right after ``torch.manual_seed(seed)``,
    computed on the CPU, for up to 1024 * 256 values and ``high - low < 2**32``: ATen's kernel runs blocks of
    256 threads, thread ``i`` calls ``curand_init(seed, i, 0)`` and one ``curand4``, and its four words go to
    elements ``i, i + T, i + 2T, i + 3T`` (``T`` threads in all), each ``low + word % (high - low)``."""
    numel = 1
    for n in shape:
        numel *= n
    threads = 256 * -(-numel // 256)  # grid = ceil(numel / 256) blocks (fewer than the SMs can hold)
    if -(-numel // 256) > 1024:
        raise ValueError(f"{numel} values: more than this replay covers (grid capped by the GPU's SMs)")
    i = torch.arange(threads, dtype=torch.int64)
    zero = torch.zeros_like(i)
    words = philox4x32_10([zero, zero, i & MASK32, i >> 32], (seed & MASK32, seed >> 32))
    flat = torch.cat(words)[:numel]  # element j = word j // T of thread j % T
    return (flat % (high - low) + low).view(shape)


def decode(args) -> None:
    import nsa_kernels.reference as ref
    from nsa_hf import nsa_backend
    from tests.hf.test_hf_decode_kernels import selection_margins
    from tests.hf.test_hf_generate import tiny_model

    seed = zlib.crc32(args.node_id.encode()) + int(os.environ.get("NSA_TEST_SEED", "0"))
    torch.manual_seed(seed)
    model = tiny_model(8, 2, layers=2)
    lengths, steps = (70, 23, 41), 42
    ids = cuda_randint(seed, 3, 100, (3, max(lengths) + 45))
    rows = [ids[i, max(lengths) - n:max(lengths) - 1 + steps] for i, n in enumerate(lengths)]
    margins = selection_margins(model, rows)
    print(f"seed {seed}; smallest relative margins per (row, layer) over the compared steps (step: margin)")
    worst = None
    for i, (n, m) in enumerate(zip(lengths, margins)):
        for layer in range(m.shape[0]):
            vals = m[layer, n - 1:]
            order = vals.argsort()[:3].tolist()
            print(f"  row {i} layer {layer}: " + ", ".join(f"{s}: {float(vals[s]):.2e}" for s in order))
            if worst is None or vals[order[0]] < worst[0]:
                worst = (float(vals[order[0]]), i, layer, n - 1 + order[0], order[0])
    _, row, layer, pos, step = worst
    print(f"tightest: row {row} step {step} (position {pos}) layer {layer}")
    _flip_effect(model.double(), rows[row][None, :pos + 1], layer, pos, ref, nsa_backend)


def _flip_effect(model, ids, layer, pos, ref, nsa_backend) -> None:
    """The last logits' change when ``layer`` takes the runner-up block at ``pos`` (every KV head whose choice
    is closest) instead of the last one chosen by score."""
    select = ref.select_blocks
    calls = []

    def flipped(scores, q_pos, params):
        out = select(scores, q_pos, params)
        calls.append(None)
        if len(calls) != layer + 1:
            return out
        t = int((q_pos == pos).nonzero())
        eligible, forced = ref.selection_block_masks(q_pos, scores.shape[-1], params)
        free = (eligible & ~forced)[t]
        need = params.slc_count - int(forced[t].sum())
        ranked = scores[:, t].masked_fill(~free, float("-inf")).sort(-1, descending=True).indices
        gap = [float(scores[h, t, ranked[h, need - 1]] - scores[h, t, ranked[h, need]]) for h in range(len(ranked))]
        h = min(range(len(gap)), key=gap.__getitem__)
        last, runner_up = int(ranked[h, need - 1]), int(ranked[h, need])
        print(f"  KV head {h}: block {last} (score {float(scores[h, t, last]):.7f}) vs block {runner_up} "
              f"({float(scores[h, t, runner_up]):.7f})")
        out = out.clone()
        out[t, h] = torch.tensor(sorted(runner_up if b == last else b for b in out[t, h].tolist()), dtype=out.dtype)
        return out

    logits = {}
    with nsa_backend(varlen="reference"), torch.no_grad():
        logits["chosen"] = model(ids, use_cache=False).logits[0, -1]
        ref.select_blocks = flipped
        try:
            logits["flipped"] = model(ids, use_cache=False).logits[0, -1]
        finally:
            ref.select_blocks = select
    d = (logits["flipped"] - logits["chosen"]).abs()
    out = int((d > 2e-3 * (1 + logits["chosen"].abs())).sum())
    print(f"  taking the runner-up changes the logits by up to {float(d.max()):.4f} ({out} of {d.numel()} outside "
          f"the fp32 test's 2e-3)")


STEPS = [1] * 20 + [3, 1, 4, 1, 5] + [1] * 7  # the decode test's teacher-forced query chunks after its prefill


def decode_choices(args) -> None:
    """The decode test's teacher-forced steps through the decode kernels on ``args.device`` (on the CPU: the
    interpreter), their chosen blocks against the float64 reference's, with the margin at every difference."""
    import nsa_hf.decoding as nsa_decoding
    import nsa_kernels.reference as ref
    from nsa_hf import NSACache, nsa_backend
    from tests.hf.test_hf_generate import tiny_model

    seed = zlib.crc32(args.node_id.encode()) + int(os.environ.get("NSA_TEST_SEED", "0"))
    torch.manual_seed(seed)
    model = tiny_model(8, 2, layers=2).to(args.device)
    lengths, width = (70, 23, 41), 70
    ids = (torch.randint(3, 100, (3, width + 45), device="cuda").cpu() if args.device == "cuda"
           else cuda_randint(seed, 3, 100, (3, width + 45)))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    chosen = []  # per decode call (layer-major within a step): (B, Hkv, Tq, n)
    original = nsa_decoding.decode_module

    class Recording:
        def nsa_decode(self, *a, check_lengths=None, **k):
            out, idx = original().nsa_decode(*a, check_lengths=check_lengths, return_block_indices=True, **k)
            chosen.append(idx.cpu())
            return out

    nsa_decoding.decode_module = Recording
    try:
        with nsa_backend(decode="triton"), torch.no_grad():
            cache, t = NSACache(config=model.config), width
            d = lambda x: x.to(args.device)  # noqa: E731
            model(d(ids[:, :t]), attention_mask=d(mask[:, :t]), position_ids=d(pos[:, :t]), past_key_values=cache,
                  use_cache=True)
            for q in STEPS:
                model(d(ids[:, t:t + q]), attention_mask=d(mask[:, :t + q]), position_ids=d(pos[:, t:t + q]),
                      past_key_values=cache, use_cache=True)
                t += q
    finally:
        nsa_decoding.decode_module = original
    # the reference's choices and scores, float64, each row uncached
    select, record = ref.select_blocks, []

    def spy(scores, q_pos, params):
        out = select(scores, q_pos, params)
        record.append((scores, out))
        return out

    reference, per_row = copy.deepcopy(model).to("cpu", torch.float64), []
    ref.select_blocks = spy
    try:
        with nsa_backend(varlen="reference"), torch.no_grad():
            for i, n in enumerate(lengths):
                record.clear()
                reference(ids[i, width - n:t][None], use_cache=False)
                per_row.append(list(record))
    finally:
        ref.select_blocks = select
    layers, differ, compared = model.config.num_hidden_layers, [], 0
    t = width
    for s, q in enumerate(STEPS):
        for layer in range(layers):
            idx = chosen[s * layers + layer]
            for row, n in enumerate(lengths):
                scores, blocks = per_row[row][layer]
                for j in range(q):
                    p = t + j - (width - n)  # the row's own position of this query
                    for h in range(idx.shape[1]):
                        ours, theirs = set(idx[row, h, j].tolist()) - {-1}, set(blocks[p, h].tolist()) - {-1}
                        compared += 1
                        if ours != theirs:
                            sc = scores[h, p]
                            gaps = [abs(float(sc[a] - sc[b])) / float(max(sc[a], sc[b]))
                                    for a in ours - theirs for b in theirs - ours]
                            differ.append((row, p, layer, h, sorted(ours - theirs), sorted(theirs - ours), max(gaps)))
        t += q
    print(f"{args.device}: {len(differ)} of {compared} (row, query, layer, KV head) choices differ from the float64 "
          f"reference")
    for row, p, layer, h, a, b, gap in differ:
        print(f"  row {row} position {p} layer {layer} KV head {h}: kernels take {a}, reference {b}; relative gap "
              f"{gap:.2e}")


def family(args) -> None:
    import nsa_kernels.reference as ref
    from nsa_hf import nsa_backend
    from nsa_hf.convert import convert_to_nsa
    from nsa_kernels import NSAParams
    from tests.hf.test_convert import SMALL, _left_padded, tiny_dense

    dense = tiny_dense(args.family).to(torch.bfloat16)
    model, _ = convert_to_nsa(dense, None, NSAParams(**SMALL), dtype="bfloat16", evaluate=False, progress=False)
    model.set_attn_implementation("nsa")
    ids, mask = _left_padded(320, [120, 77])
    select, record = ref.select_blocks, []

    def spy(scores, q_pos, params):
        out = select(scores, q_pos, params)
        record.append((scores.double(), q_pos, out))
        return out

    runs = {}
    ref.select_blocks = spy
    try:
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            record.clear()
            with nsa_backend(varlen="reference"), torch.no_grad():
                logits = copy.deepcopy(model).to(dtype)(ids, attention_mask=mask).logits.double()
            runs[dtype] = (logits, list(record))
    finally:
        ref.select_blocks = select
    keep = mask.bool()
    got, want = runs[torch.bfloat16][0], runs[torch.float32][0]
    bad = ((got - want).abs() > 0.1 + 0.05 * want.abs()) & keep[..., None]
    print(f"{args.family}: bf16 vs float32 reference: {int(bad.sum())} of {int(keep.sum()) * got.shape[-1]} logits "
          f"outside atol 0.1 / rtol 0.05, max {float((got - want).abs()[keep].max()):.3f}")
    for b, t in bad.any(-1).nonzero().tolist():
        print(f"  row {b} position {t - int((~keep[b]).sum())}: {int(bad[b, t].sum())} logits, max "
              f"{float((got - want)[b, t].abs().max()):.3f}")
    rows = len(ids)
    print("block choices bf16 flips (calls are layer-major, one per row):")
    for call, ((_, q_pos, ours), (_, _, theirs), (exact, _, _)) in enumerate(
            zip(runs[torch.bfloat16][1], runs[torch.float32][1], runs[torch.float64][1])):
        for t, h in (ours != theirs).any(-1).nonzero().tolist():
            a, b = set(theirs[t, h].tolist()) - set(ours[t, h].tolist()), set(ours[t, h].tolist()) - set(theirs[t, h].tolist())
            for j32, j16 in zip(sorted(a), sorted(b)):
                s32, s16 = float(exact[h, t, j32]), float(exact[h, t, j16])
                print(f"  layer {call // rows} row {call % rows} position {int(q_pos[t])} KV head {h}: float32 takes "
                      f"block {j32}, bf16 block {j16}; float64 scores {s32:.6f} vs {s16:.6f} (relative margin "
                      f"{abs(s32 - s16) / max(s32, s16):.1e})")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    d = sub.add_parser("decode", help="the fp32 decode-kernel test's inputs: selection margins, the flip's effect")
    d.add_argument("--node-id", default=DECODE_TEST, help="pytest node id that seeds the test (conftest.py)")
    c = sub.add_parser("decode-choices", help="the decode test's steps through the decode kernels: their chosen "
                       "blocks against the float64 reference (run it on the GPU)")
    c.add_argument("--node-id", default=DECODE_TEST, help="pytest node id that seeds the test (conftest.py)")
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    f = sub.add_parser("family", help="the per-family bf16 test: bf16 vs float32 reference, flipped choices")
    f.add_argument("--family", default="mistral")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    {"decode": decode, "decode-choices": decode_choices, "family": family}[args.what](args)


if __name__ == "__main__":
    main()
