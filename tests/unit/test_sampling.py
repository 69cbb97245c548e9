"""The sampler draws from the temperature-scaled top-k distribution (the exponential race
in logs: argmax(s - log E), the Gumbel-max trick) with Exp(1) draws made inside the
frame step from (seed, frame, code) alone; greedy rows take the argmax; and it draws
what the earlier form argmax(softmax(s) / E) drew."""

import math

import torch

from csm_triton import constants as C
from csm_triton.engine.sampling import SamplerState, log_exponential_draws, sample, top_k_index

COUNTERS = torch.arange(C.NUM_CODEBOOKS * C.CODEBOOK_SIZE).view(1, C.NUM_CODEBOOKS, C.CODEBOOK_SIZE)


def draws(seeds, frames, sampled=None, codebooks=slice(None)):
    """log E [B, codebooks, 2048] for these requests' seeds at these frame indices (the
    draws of a codebook are those of its counters: a slice computes only those)."""
    seeds, frames = torch.tensor(seeds), torch.tensor(frames)
    sampled = torch.ones_like(seeds) if sampled is None else torch.tensor(sampled)
    return log_exponential_draws(seeds & 0xFFFF_FFFF, seeds >> 32, frames, sampled, COUNTERS[:, codebooks])


def test_the_draws_are_exponential_and_uniform_through_the_hash():
    log_e = draws([12345, 2**62 + 7, 0], [0, 3, 2**31])
    exponential = log_e.exp().flatten().double()
    assert abs(exponential.mean().item() - 1) < 0.01 and abs(exponential.var().item() - 1) < 0.03
    uniform = torch.exp(-exponential)  # back to the uniform the hash made
    counts = torch.histc(uniform.float(), bins=64, min=0, max=1)
    expected = uniform.numel() / 64
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 120, chi2  # 63 degrees of freedom: p < 1e-5 above ~120
    assert torch.isfinite(log_e).all()
    # The extremes of the hash stay finite too (a draw of exactly 0 would let a masked code win).
    extremes = torch.tensor([0, 2**32 - 1]) >> 9
    assert torch.isfinite(torch.log(-torch.log((extremes.float() + 0.5) * 2.0**-23))).all()


def test_draws_of_neighbouring_codes_frames_and_seeds_are_uncorrelated():
    log_e = draws([1, 2, 1], [5, 5, 6])
    flat = [row.flatten().double() for row in log_e]
    assert abs(torch.corrcoef(torch.stack([flat[0][:-1], flat[0][1:]]))[0, 1]) < 0.02  # code c vs c+1
    assert abs(torch.corrcoef(torch.stack([flat[0], flat[1]]))[0, 1]) < 0.02  # seed 1 vs 2
    assert abs(torch.corrcoef(torch.stack([flat[0], flat[2]]))[0, 1]) < 0.02  # frame 5 vs 6


def test_a_requests_draws_are_its_own_whatever_its_row_and_batch_mates():
    alone = draws([99], [17])
    among = draws([5, 6, 99, 7], [0, 40, 17, 3])
    assert torch.equal(among[2], alone[0])
    assert not torch.equal(draws([99], [18])[0], alone[0]) and not torch.equal(draws([98], [17])[0], alone[0])
    assert torch.equal(draws([99, 99], [17, 17], sampled=[1, 0])[1], torch.zeros_like(alone[0]))  # greedy: none


def test_frequencies_follow_the_softmax_of_the_top_k():
    rows, vocab = 40_000, 64  # the draws of codes 0..63 (a slice of the counters: the hash is per code)
    logits = torch.full((rows, vocab), -5.0)
    logits[:, :5] = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    seeds = torch.arange(1000, 1000 + rows)
    log_e = log_exponential_draws(
        seeds,
        seeds >> 32,
        torch.zeros(rows, dtype=torch.long),
        torch.ones(rows, dtype=torch.long),
        COUNTERS[:, 4:5, :vocab],
    )[:, 0]  # codebook 4's draws of codes 0..63
    codes = sample(logits, torch.full((rows,), 0.9), top_k_index(torch.full((rows,), 3), 64), log_e, 64)
    expected = torch.softmax(logits[0, :3] / 0.9, dim=0)
    observed = torch.bincount(codes, minlength=vocab).float() / rows
    assert observed[3:].sum() == 0, "nothing outside the top-k"
    assert torch.allclose(observed[:3], expected, atol=0.01)


def test_greedy_rows_take_the_argmax_through_the_same_kernels():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0], [1.0, 1.0 + 2**-20, 1.0]])
    greedy = [SamplerState.create(temperature=0.7, top_k=2, greedy=True, seed=None) for _ in range(3)]
    temperature = torch.tensor([state.temperature for state in greedy])
    codes = sample(logits, temperature, top_k_index(torch.full((3,), 2), 3), torch.zeros(3, 3))
    assert temperature.tolist() == [1.0, 1.0, 1.0]  # whatever was asked: an exact division
    assert codes.tolist() == logits.argmax(dim=-1).tolist() == [1, 0, 1]
    assert [state.row(10, 4, 64)[5] for state in greedy] == [0, 0, 0]  # "not sampled": log E = 0


def test_a_seed_is_packed_whole_and_a_missing_one_is_random():
    state = SamplerState.create(temperature=0.9, top_k=80, greedy=False, seed=2**62 + 12345)
    position, top_k, low, high, frame, sampled = state.row(300, 7, 64)
    assert (position, top_k, frame, sampled) == (300, 64, 7, 1)  # top_k clamped to the step's bound
    assert high << 32 | low == 2**62 + 12345
    assert (
        SamplerState.create(temperature=1, top_k=5, greedy=False, seed=None).seed
        != SamplerState.create(temperature=1, top_k=5, greedy=False, seed=None).seed
    )


def test_a_top_k_bound_draws_exactly_what_the_whole_vocabulary_draws():
    # The engine finds the k-th score with torch.topk over `top_k_bound` candidates
    # instead of sorting all 2048: same codes, for every row.
    torch.manual_seed(0)
    rows, vocab = 32, 2048
    logits = torch.randn(rows, vocab) * 3
    top_k = torch.randint(1, 65, (rows,))
    temperature = torch.rand(rows) + 0.5
    log_e = draws(list(range(rows)), [1] * rows, codebooks=slice(0, 1))[:, 0]
    whole = sample(logits, temperature, top_k_index(top_k, vocab), log_e)
    assert torch.equal(sample(logits, temperature, top_k_index(top_k, 64), log_e, top_k_bound=64), whole)
    assert torch.equal(sample(logits, temperature, top_k_index(top_k, 2048), log_e, top_k_bound=2048), whole)


def test_the_log_form_draws_what_softmax_over_the_draws_drew():
    # argmax(p / E) == argmax(log p - log E) == argmax(s - log E): the same draw, except
    # where rounding makes two candidates tie (none in 4,096 rows here).
    torch.manual_seed(1)
    rows, vocab = 4096, 2048
    logits = torch.randn(rows, vocab) * 4
    temperature = torch.rand(rows) + 0.3
    top_k = torch.randint(1, 65, (rows,))
    log_e = draws(list(range(rows)), [2] * rows, codebooks=slice(3, 4))[:, 0]
    scores = logits / temperature[:, None]
    kth = torch.sort(scores, dim=-1, descending=True).values.gather(1, (top_k - 1)[:, None])
    before = (torch.softmax(scores.masked_fill(scores < kth, -math.inf), dim=-1) / log_e.exp()).argmax(dim=-1)
    assert torch.equal(sample(logits, temperature, top_k_index(top_k, 64), log_e, top_k_bound=64), before)
