"""The shape checks shared by the Triton entry points (``primitives.check_qkv_shapes``): the fused NSA call
(``parallel.check_nsa_shapes``, on q, k, v) and compressed attention (``primitives.check_cmp_inputs``, on
q, cmp_k, cmp_v) reject the same mistakes and name the tensors the caller passed. No kernel runs."""
import pytest
import torch

from nsa_kernels.params import NSAParams
from nsa_kernels.parallel import check_nsa_shapes
from nsa_kernels.primitives import check_cmp_inputs

PARAMS = NSAParams(cmp_block=8, cmp_stride=4, slc_block=16, slc_count=4, init_blocks=1, local_blocks=2, window=32)
T, HQ, HKV, D, DV, NC = 20, 4, 2, 16, 8, 4


def _inputs():
    cu = torch.tensor([0, T], dtype=torch.int32)
    return dict(q=torch.randn(T, HQ, D), k=torch.randn(T, HKV, D), v=torch.randn(T, HKV, DV),
                cmp_k=torch.randn(NC, HKV, D), cmp_v=torch.randn(NC, HKV, DV), gates=torch.rand(T, HQ, 3),
                cu_q=cu, cu_k=cu, cu_c=torch.tensor([0, NC], dtype=torch.int32))


def _nsa(x):
    check_nsa_shapes(x["q"], x["k"], x["v"], x["cmp_k"], x["cmp_v"], x["gates"], x["cu_q"], x["cu_k"], x["cu_c"],
                     PARAMS)


def _cmp(x):
    return check_cmp_inputs(x["q"], x["cmp_k"], x["cmp_v"], x["cu_q"], x["cu_k"], x["cu_c"], 8, 4, max_seqlen_k=T)


def test_good_inputs_pass():
    x = _inputs()
    _nsa(x)
    assert _cmp(x) == (T, NC)


# (what to break, for the NSA call, for compressed attention, the message)
CASES = [
    ("rank", dict(k=torch.randn(T, HKV * D)), dict(cmp_k=torch.randn(NC, HKV * D)), r"must be \(tokens, heads, head_dim\)"),
    ("gqa", dict(q=torch.randn(T, 3, D)), dict(q=torch.randn(T, 3, D)), r"query heads \(3\) must be a multiple of "
     r"key/value heads \(2\)"),
    ("heads", dict(v=torch.randn(T, 1, DV)), dict(cmp_v=torch.randn(NC, 1, DV)), "shapes disagree"),
    ("head_dim", dict(q=torch.randn(T, HQ, 8)), dict(q=torch.randn(T, HQ, 8)), "shapes disagree"),
]


@pytest.mark.parametrize("what,nsa_change,cmp_change,match", CASES, ids=[c[0] for c in CASES])
def test_both_entry_points_reject_the_same_shapes_naming_their_tensors(what, nsa_change, cmp_change, match):
    with pytest.raises(ValueError, match=match) as nsa_err:
        _nsa({**_inputs(), **nsa_change})
    with pytest.raises(ValueError, match=match) as cmp_err:
        _cmp({**_inputs(), **cmp_change})
    if what in ("rank", "heads", "head_dim"):
        assert "cmp_k" not in str(nsa_err.value) and "cmp_k" in str(cmp_err.value), (nsa_err.value, cmp_err.value)
