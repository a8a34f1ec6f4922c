"""Host work of one NSA layer call on the Triton path: a count, not a time (``research.count_host_ops``).

At short lengths the layer is bound by host work (torch ops of the index preparation, kernel launches,
device-to-host copies), so these bounds keep it from growing unnoticed. They count what the code
dispatches, which is the same under the interpreter (CPU) as on a GPU.
"""
import torch

from research.count_host_ops import count_host_ops, count_layer

LENS = (40, 23)  # two packed sequences, odd lengths; the counts do not depend on the lengths

# Triton launches per call. Forward: cmp, selection, slc index preparation, slc (per-token tiles + union
# tiles), win, gates.
MAX_FWD_LAUNCHES = 7
# Backward: gates, win dq + dk/dv, slc dq (two launches, as the forward) + inverted index (two) + dk/dv,
# cmp delta + dq + dk/dv.
MAX_BWD_LAUNCHES = 11
# torch ops (allocations, autograd's gradient sums, the cumsum of the slc backward's inverted index),
# forward + backward of the layer alone: 69 when this bound was set (20 + 49; 147 = 20 + 127 before the
# inverted index moved into two kernels, 272 = 92 + 180 before the window's work lists and the slc index
# preparation moved into kernels and the non-differentiable outputs stopped getting zero gradients).
MAX_TORCH_OPS = 80


def test_counter_sees_syncs_and_launches():
    """The counter is not blind: .item(), .tolist(), nonzero and a Triton launch are all counted."""
    from nsa_kernels.parallel import parallel_gate

    x = torch.arange(6.0).reshape(2, 1, 3)
    with count_host_ops() as c:
        x.sum().item()
        x.tolist()
        torch.nonzero(x)
        parallel_gate(x, x, x, torch.ones(2, 1, 3))
    assert c.n_syncs == 3, c.syncs
    assert c.n_launches == 1, c.launches


def test_layer_with_host_sizes_never_syncs():
    """As the HF backend and the benchmark call it (offsets and max lengths known on the host): no
    device-to-host copy in the forward or the backward, and bounded launches and torch ops."""
    fwd, bwd, _, _ = count_layer(lens=LENS, host_sizes=True, compression=False)
    assert fwd.n_syncs == 0 and bwd.n_syncs == 0, (fwd.syncs, bwd.syncs)
    assert fwd.n_launches <= MAX_FWD_LAUNCHES, fwd.launches
    assert bwd.n_launches <= MAX_BWD_LAUNCHES, bwd.launches
    assert fwd.n_ops + bwd.n_ops <= MAX_TORCH_OPS, (fwd.ops, bwd.ops)


def test_layer_without_sizes_syncs_once():
    """Without max lengths the entry point copies the three offsets to the host once (one transfer,
    to validate them and size the cmp/selection grids); nothing else, the backward included."""
    fwd, bwd, _, _ = count_layer(lens=LENS, host_sizes=False, compression=False)
    assert fwd.n_syncs == 1 and bwd.n_syncs == 0, (fwd.syncs, bwd.syncs)
    assert fwd.n_launches + bwd.n_launches <= MAX_FWD_LAUNCHES + MAX_BWD_LAUNCHES
