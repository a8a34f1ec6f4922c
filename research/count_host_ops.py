"""How much host work does one NSA layer call do? Counts, not times (runs on a CPU).

For one call of :func:`nsa_kernels.nsa_attention_varlen` on the Triton path (the path training takes on
a GPU) and for its backward, this counts

* **torch ops**: every PyTorch operator dispatched (``TorchDispatchMode``; the insides of the
  ``nsa_kernels::*`` custom ops included, the Triton interpreter's own tensor traffic excluded), split
  into ops that launch a device kernel on a GPU and metadata-only ones (views, ``empty``);
* **Triton launches**: calls of a ``@triton.jit`` kernel's ``run`` (compiled or interpreted);
* **syncs**: operations that wait for the GPU and copy to the host: the aten ops that do
  (``_local_scalar_dense`` = ``.item()``/``int()``/``bool()``, ``nonzero``, ``unique``,
  ``masked_select``, ``bincount``, ``repeat_interleave`` without an output size, ``equal``, indexing
  with a boolean mask) and the Python calls that copy a tensor to the host (``.tolist()``, ``.cpu()``,
  ``.numpy()``, ``.to("cpu")``: on a CPU these dispatch nothing, so they are counted where they are
  called).

Two ways of calling the layer are counted: as the HF backend and ``benchmarks/bench_training.py`` call it
(``max_seqlen_q``/``max_seqlen_k`` given, ``compress_varlen(..., bounds=...)``) and plainly (the entry
point then copies the offsets once to validate them and size the grids). Tiny shapes under
``TRITON_INTERPRET=1`` (set here when no GPU is present); the counts do not depend on the sizes, only
on the number of packed sequences.

Usage::

    python -m research.count_host_ops
    python -m research.count_host_ops --seqs 3 --group 4 --ops
"""
from __future__ import annotations

import argparse
import contextlib
import os
from collections import Counter
from dataclasses import dataclass, field

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch._library.custom_ops import _maybe_get_opdef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# aten ops that wait for the device and copy a value to the host.
SYNC_OPS = {
    "_local_scalar_dense", "nonzero", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim",
    "masked_select", "bincount", "equal", "histc",
}
# aten ops that launch no device kernel (views, allocation without initialisation, metadata).
NO_KERNEL_OPS = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "permute", "expand", "slice", "select", "unsqueeze",
    "squeeze", "t", "transpose", "as_strided", "detach", "alias", "empty", "empty_like", "new_empty",
    "empty_strided", "new_empty_strided", "unbind", "split", "split_with_sizes", "lift_fresh", "diagonal",
    "unfold", "_to_copy_noop", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
    "unflatten", "flatten", "view_as", "_conj", "_neg_view", "resolve_conj", "resolve_neg", "narrow",
}


@dataclass
class Counts:
    """What one region of code dispatched."""

    ops: Counter = field(default_factory=Counter)  # torch op name -> calls
    launches: Counter = field(default_factory=Counter)  # Triton kernel name -> launches
    syncs: Counter = field(default_factory=Counter)  # what synchronised -> calls

    @property
    def n_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def n_kernel_ops(self) -> int:
        """Torch ops that launch a device kernel on a GPU (custom-op wrappers and views excluded)."""
        return sum(n for name, n in self.ops.items() if _base(name) not in NO_KERNEL_OPS and "::" not in name)

    @property
    def n_launches(self) -> int:
        return sum(self.launches.values())

    @property
    def n_syncs(self) -> int:
        return sum(self.syncs.values())


def _base(name: str) -> str:
    return name.split("::")[-1].split(".")[0]


def _is_bool_index(func, args) -> bool:
    name = _base(func.__name__ if hasattr(func, "__name__") else str(func))
    if name not in ("index", "index_put", "index_put_", "_index_put_impl", "_index_put_impl_"):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class _Counter(TorchDispatchMode):
    def __init__(self, counts: Counts):
        super().__init__()
        self.counts = counts
        self.in_kernel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.in_kernel:  # the interpreter's own copies in and out of a kernel
            return func(*args, **kwargs)
        ns = func.namespace
        name = f"{ns}::{func.__name__}" if ns != "aten" else func.__name__
        self.counts.ops[name] += 1
        base = _base(name)
        if ns == "aten" and (base in SYNC_OPS or _is_bool_index(func, args)):
            self.counts.syncs[f"aten.{func.__name__}"] += 1
        elif ns == "aten" and base == "repeat_interleave" and kwargs.get("output_size") is None and \
                func.__name__.endswith("Tensor"):
            self.counts.syncs[f"aten.{func.__name__}"] += 1
        opdef = _maybe_get_opdef(func) if ns != "aten" else None
        if opdef is not None:  # a custom op (nsa_kernels::*): count what runs inside it as well
            with self:
                return opdef._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_ops():
    """Count torch ops, Triton launches and host syncs inside the ``with`` block; yields a :class:`Counts`."""
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - older triton
        InterpretedFunction = None
    counts = Counts()
    mode = _Counter(counts)
    patched = []

    def patch(owner, attr, make):
        old = getattr(owner, attr)
        setattr(owner, attr, make(old))
        patched.append((owner, attr, old))

    def launch(old):
        def run(self, *args, **kwargs):
            if not kwargs.get("warmup", False) and not mode.in_kernel:
                counts.launches[getattr(self, "__name__", None) or self.fn.__name__] += 1
            mode.in_kernel += 1
            try:
                return old(self, *args, **kwargs)
            finally:
                mode.in_kernel -= 1
        return run

    def host_copy(what, old, cpu_only=False):
        def method(self, *args, **kwargs):
            if not mode.in_kernel and (not cpu_only or _to_cpu(args, kwargs)):
                counts.syncs[f"Tensor.{what}"] += 1
            return old(self, *args, **kwargs)
        return method

    for cls in (JITFunction, InterpretedFunction):
        if cls is not None:
            patch(cls, "run", launch)
    for what in ("tolist", "cpu", "numpy"):
        patch(torch.Tensor, what, lambda old, what=what: host_copy(what, old))
    patch(torch.Tensor, "to", lambda old: host_copy("to(cpu)", old, cpu_only=True))
    try:
        with mode:
            yield counts
    finally:
        for owner, attr, old in reversed(patched):
            setattr(owner, attr, old)


def _to_cpu(args, kwargs) -> bool:
    dev = kwargs.get("device")
    for a in args:
        if isinstance(a, (str, torch.device)):
            dev = a
    return dev is not None and torch.device(dev).type == "cpu"


# ------------------------------------------------------------------------------------------------
# The layer call
# ------------------------------------------------------------------------------------------------


def layer_inputs(lens, hq, hkv, d, params, seed=0, device="cpu"):
    """Random packed inputs of one NSA layer (leaves needing gradients) and two MLP compressors."""
    from nsa_kernels import MLPCompressor

    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    leaves = [torch.randn(n, h, d, generator=g) for h in (hq, hkv, hkv)]
    leaves.append(torch.rand(n, hq, 3, generator=g))
    leaves = [x.to(device).requires_grad_() for x in leaves]
    cu = torch.tensor([0] + list(lens)).cumsum(0).to(torch.int32).to(device)
    torch.manual_seed(seed)
    comps = [MLPCompressor(d, params.cmp_block).to(device) for _ in range(2)]
    return leaves, cu, comps


def count_layer(lens=(70, 33), hq=4, hkv=2, d=16, params=None, host_sizes=True, compression=True, seed=0):
    """``(forward Counts, backward Counts, output, gradients)`` of one layer call, as training runs it.
    With ``compression`` the compression of keys and values (``compress_varlen`` with MLP compressors)
    is counted with the layer; otherwise the compressed keys/values are leaves made beforehand, so
    that only :func:`nsa_kernels.nsa_attention_varlen` and its backward are counted. ``host_sizes``:
    pass the offsets and maximum lengths from the host (as the HF backend does)."""
    from nsa_kernels import NSAParams, compress_varlen, nsa_attention_varlen

    params = params or NSAParams(cmp_block=8, cmp_stride=4, slc_block=16, slc_count=4, init_blocks=1,
                                 local_blocks=2, window=24)
    leaves, cu, comps = layer_inputs(lens, hq, hkv, d, params, seed)
    q, k, v, gates = leaves
    bounds = [0]
    for n in lens:
        bounds.append(bounds[-1] + n)
    kw = dict(bounds=bounds) if host_sizes else {}
    sizes = dict(max_seqlen_q=max(lens), max_seqlen_k=max(lens)) if host_sizes else {}

    def compress():
        ck, cu_c = compress_varlen(k, cu, comps[0], params.cmp_block, params.cmp_stride, **kw)
        cv, _ = compress_varlen(v, cu, comps[1], params.cmp_block, params.cmp_stride, **kw)
        return ck, cv, cu_c

    if not compression:
        ck, cv, cu_c = (x.detach().requires_grad_() if x.is_floating_point() else x for x in compress())
        leaves += [ck, cv]
    with count_host_ops() as fwd:
        if compression:
            ck, cv, cu_c = compress()
        out = nsa_attention_varlen(q, k, v, ck, cv, gates, cu, cu, cu_c, params, backend="triton", **sizes)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    with count_host_ops() as bwd:
        out.backward(grad)
    grads = [x.grad for x in leaves] + [p.grad for c in comps for p in c.parameters()]
    return fwd, bwd, out.detach(), grads


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=2, help="packed sequences in the call (default 2)")
    ap.add_argument("--group", type=int, default=2, help="query heads per KV head (2 KV heads)")
    ap.add_argument("--ops", action="store_true", help="also list the torch ops and kernels by name")
    ap.add_argument("--save", default=None, help="torch.save the outputs and gradients of every call here")
    ap.add_argument("--compare", default=None,
                    help="a --save file of an earlier run: report whether outputs and gradients are bit-identical")
    return ap.parse_args(argv)


def table(rows) -> str:
    head = ("call", "pass", "torch ops", "with a device kernel", "Triton launches", "syncs", "what synced")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, pass_, c in rows:
        synced = ", ".join(f"{k} x{n}" for k, n in sorted(c.syncs.items())) or "-"
        lines.append(f"| {label} | {pass_} | {c.n_ops} | {c.n_kernel_ops} | {c.n_launches} | {c.n_syncs} | {synced} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    lens = [70, 33, 51, 45, 88, 20, 64, 39][: args.seqs]
    rows, detail, results = [], [], {}
    for label, host_sizes, compression in (
        ("layer, host sizes (HF backend, bench)", True, False),
        ("compression + layer, host sizes", True, True),
        ("layer, no sizes given", False, False),
    ):
        fwd, bwd, out, grads = count_layer(lens=lens, hq=2 * args.group, hkv=2, host_sizes=host_sizes,
                                           compression=compression)
        results[label] = [out] + grads
        rows += [(label, "forward", fwd), (label, "backward", bwd)]
        detail.append((label, fwd, bwd))
    print(f"{len(lens)} packed sequences, 2 KV heads, group {args.group}, TRITON_INTERPRET="
          f"{os.environ.get('TRITON_INTERPRET', '0')}\n")
    print(table(rows))
    if args.save:
        torch.save(results, args.save)
    if args.compare:
        earlier = torch.load(args.compare)
        for label, tensors in results.items():
            same = [(a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                    for a, b in zip(tensors, earlier[label], strict=True)]
            print(f"{label}: {sum(same)}/{len(same)} tensors bit-identical to {args.compare}")
    if args.ops:
        for label, fwd, bwd in detail:
            for pass_, c in (("forward", fwd), ("backward", bwd)):
                print(f"\n## {label}, {pass_}\nTriton: " + ", ".join(f"{k} x{n}" for k, n in c.launches.most_common()))
                print("torch: " + ", ".join(f"{k} x{n}" for k, n in c.ops.most_common()))


if __name__ == "__main__":
    main()
