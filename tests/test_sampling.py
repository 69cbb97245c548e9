"""The sampler draws from the temperature-scaled top-k distribution (the exponential race
in logs: argmax(s - log E), the Gumbel-max trick), greedy rows take the argmax, and it
draws what the earlier form argmax(softmax(s) / E) drew."""

import torch

from csm_triton.engine.sampling import SamplerState, log_noise, sample, top_k_index


def draw(logits, temperature, top_k, draws, seed=0):
    state = SamplerState.create(temperature=temperature, top_k=top_k, greedy=False, seed=seed, device="cpu")
    noise = torch.empty(draws, logits.shape[-1])
    for row in noise:
        state.fill_noise(row)
    batch = logits.expand(draws, -1)
    vocab = logits.shape[-1]
    return sample(batch, torch.full((draws,), temperature), top_k_index(torch.full((draws,), top_k), vocab),
                  log_noise(noise))


def test_frequencies_follow_the_softmax_of_the_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    codes = draw(logits, temperature=0.9, top_k=3, draws=40_000)
    expected = torch.softmax(logits[0, :3] / 0.9, dim=0)
    observed = torch.bincount(codes, minlength=6).float() / len(codes)
    assert observed[3:].sum() == 0, "nothing outside the top-k"
    assert torch.allclose(observed[:3], expected, atol=0.01)


def test_greedy_rows_take_the_argmax_through_the_same_kernels():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0], [1.0, 1.0 + 2**-20, 1.0]])
    greedy = [SamplerState.create(temperature=0.7, top_k=2, greedy=True, seed=None, device="cpu") for _ in range(3)]
    noise = torch.empty(3, 3)
    for state, row in zip(greedy, noise):
        state.fill_noise(row)
    temperature = torch.tensor([state.temperature for state in greedy])
    codes = sample(logits, temperature, top_k_index(torch.full((3,), 2), 3), log_noise(noise))
    assert temperature.tolist() == [1.0, 1.0, 1.0]  # whatever was asked: an exact division
    assert codes.tolist() == logits.argmax(dim=-1).tolist() == [1, 0, 1]


def test_same_seed_same_draws():
    logits = torch.randn(1, 50)
    assert torch.equal(draw(logits, 1.0, 50, 20, seed=3), draw(logits, 1.0, 50, 20, seed=3))
    assert not torch.equal(draw(logits, 1.0, 50, 20, seed=3), draw(logits, 1.0, 50, 20, seed=4))


def test_a_top_k_bound_draws_exactly_what_the_whole_vocabulary_draws():
    # The engine finds the k-th score with torch.topk over `top_k_bound` candidates
    # instead of sorting all 2048: same codes, for every row.
    torch.manual_seed(0)
    rows, vocab = 32, 2048
    logits = torch.randn(rows, vocab) * 3
    top_k = torch.randint(1, 65, (rows,))
    temperature = torch.rand(rows) + 0.5
    noise = log_noise(torch.empty(rows, vocab).exponential_())
    whole = sample(logits, temperature, top_k_index(top_k, vocab), noise)
    assert torch.equal(sample(logits, temperature, top_k_index(top_k, 64), noise, top_k_bound=64), whole)
    assert torch.equal(sample(logits, temperature, top_k_index(top_k, 2048), noise, top_k_bound=2048), whole)


def test_the_log_form_draws_what_softmax_over_the_draws_drew():
    # argmax(p / E) == argmax(log p - log E) == argmax(s - log E): the same draw, except
    # where rounding makes two candidates tie (none in 4,096 rows here).
    torch.manual_seed(1)
    rows, vocab = 4096, 2048
    logits = torch.randn(rows, vocab) * 4
    temperature = torch.rand(rows) + 0.3
    top_k = torch.randint(1, 65, (rows,))
    noise = torch.empty(rows, vocab).exponential_()
    scores = logits / temperature[:, None]
    kth = torch.sort(scores, dim=-1, descending=True).values.gather(1, (top_k - 1)[:, None])
    before = (torch.softmax(scores.masked_fill(scores < kth, float("-inf")), dim=-1) / noise).argmax(dim=-1)
    assert torch.equal(sample(logits, temperature, top_k_index(top_k, 64), log_noise(noise), top_k_bound=64), before)


def test_a_draw_of_exactly_zero_never_picks_a_masked_code():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    noise = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # 0: log would be -inf, a masked score NaN
    assert sample(logits, torch.ones(1), top_k_index(torch.tensor([2]), 4), log_noise(noise)).item() in (0, 1)
