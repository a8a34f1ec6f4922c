"""Worker of ``tests/integration/test_fsdp_cpu.py``: a few AdamW steps of an NSA-Llama checkpoint on fixed packed
batches (the first ``NSA_ONLY_STEPS`` with only the NSA modules trainable, then all weights), either in
one process (the reference: the ranks' batches one after another, gradients accumulated) or under
``torchrun`` with FSDP2 (``fully_shard`` on every decoder layer and the root, gloo on CPU; 2 processes,
or 1 that runs both ranks' batches). The loss of a step is the token mean over the whole global batch
in every case.

    python tests/integration/fsdp_worker.py MODEL_DIR OUT_DIR                    # reference, one process
    torchrun --nproc_per_node 2 tests/integration/fsdp_worker.py MODEL_DIR OUT_DIR --fsdp

Writes ``OUT_DIR/losses.json`` (``{"losses", "world_size", "fsdp_units"}``) and the trained model
(``nsa_hf.training.save_trained_model``: under FSDP the full state dict gathered on rank 0).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

import nsa_hf  # noqa: F401  (registers NSA-Llama)
from nsa_hf.training import fsdp_units, save_trained_model, set_trainable

RANKS = 2
NSA_ONLY_STEPS = 2  # the first steps train only the NSA modules (train.py's --nsa-only-steps), then all
# Document lengths per step and rank: packed rows of one or two documents, odd lengths, and at step 2 a
# rank whose only document (5 tokens) is shorter than a compression block, so that rank's compressors
# see no complete block (every parameter must still take part in the backward, or FSDP's gradient
# reduce-scatter waits forever).
DOC_LENGTHS = [
    [[61, 19], [77]],
    [[5], [40, 33]],
    [[90], [23, 51]],
    [[12, 70], [66]],
]


def documents(step: int, rank: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in DOC_LENGTHS[step][rank]]


def label_count(step: int) -> int:
    """Predicted tokens of the whole global batch of ``step`` (each document's first token is not)."""
    return sum(n - 1 for rank in DOC_LENGTHS[step] for n in rank)


def summed_loss(model, docs: list[list[int]]) -> torch.Tensor:
    """Sum of next-token losses over the packed row of ``docs`` (no loss across document boundaries)."""
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": d} for d in docs])
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits.float()
    return F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 under torchrun (one rank per entry of DOC_LENGTHS)")
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="nsa", dtype=torch.float32)
    model.train()
    rank, world = 0, 1
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if RANKS % world:
            raise SystemExit(f"--fsdp needs a number of processes that divides {RANKS}, got {world}")
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    units = fsdp_units(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    losses = []
    for step in range(len(DOC_LENGTHS)):
        if step in (0, NSA_ONLY_STEPS):  # frozen and trainable parameters share FSDP units in the first phase
            set_trainable(model, "nsa" if step < NSA_ONLY_STEPS else "all")
        total = label_count(step)
        if args.fsdp:
            # FSDP averages gradients over the ranks: scale by the world size to get the global token mean.
            local = sum(summed_loss(model, documents(step, r, model.config.vocab_size))
                        for r in range(rank, RANKS, world))  # this process's ranks of the global batch
            (local * world / total).backward()
            value = local.detach().clone()
            dist.all_reduce(value)
        else:
            value = torch.zeros(())
            for r in range(RANKS):
                local = summed_loss(model, documents(step, r, model.config.vocab_size))
                (local / total).backward()
                value += local.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(value) / total)
    out = Path(args.out)
    save_trained_model(model, out)
    if rank == 0:
        (out / "losses.json").write_text(json.dumps({"losses": losses, "world_size": world, "fsdp_units": units}))
    if args.fsdp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
