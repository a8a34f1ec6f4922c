"""research/selection_ties.py: the CPU replay of a CUDA random draw (Philox4x32-10) that lets the harness
rebuild a GPU test's inputs."""
import pytest
import torch

from research.selection_ties import cuda_randint, philox4x32_10


def test_philox_known_answers():
    # Random123's known-answer vectors for philox4x32_10
    zero, ones = torch.zeros(1, dtype=torch.int64), torch.full((1,), 0xFFFFFFFF)
    assert [int(w) for w in philox4x32_10([zero] * 4, (0, 0))] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert [int(w) for w in philox4x32_10([ones] * 4, (0xFFFFFFFF, 0xFFFFFFFF))] == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    pi = [torch.tensor([x]) for x in (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)]
    assert [int(w) for w in philox4x32_10(pi, (0xA4093822, 0x299F31D0))] == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_cuda_randint_replay_range_and_layout():
    a = cuda_randint(123, 3, 100, (3, 115))
    assert a.shape == (3, 115) and a.dtype == torch.int64 and int(a.min()) >= 3 and int(a.max()) < 100
    # element j comes from thread j % T (T = 512 threads for 345 values): its first word for j < 512
    assert torch.equal(cuda_randint(123, 3, 100, (512,))[:345], a.flatten())
    with pytest.raises(ValueError, match="more than this replay covers"):
        cuda_randint(0, 0, 10, (1025 * 256,))


@pytest.mark.gpu
@pytest.mark.parametrize("seed, shape", [(3572570599, (3, 115)), (7, (1000,)), (2**33 + 5, (4, 300))])
def test_cuda_randint_replays_torch_on_the_gpu(seed, shape):
    torch.manual_seed(seed)
    assert torch.equal(torch.randint(3, 100, shape, device="cuda").cpu(), cuda_randint(seed, 3, 100, shape))
