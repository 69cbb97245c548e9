"""The exponential-race sampler draws from the temperature-scaled top-k distribution."""

import torch

from csm_triton.engine.sampling import SamplerState, sample


def draw(logits, temperature, top_k, draws, seed=0):
    state = SamplerState.create(temperature=temperature, top_k=top_k, greedy=False, seed=seed, device="cpu")
    noise = torch.empty(draws, logits.shape[-1])
    for row in noise:
        state.fill_noise(row)
    batch = logits.expand(draws, -1)
    return sample(batch, torch.full((draws,), temperature), torch.full((draws,), top_k, dtype=torch.long),
                  torch.zeros(draws, dtype=torch.bool), noise)


def test_frequencies_follow_the_softmax_of_the_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")]])
    codes = draw(logits, temperature=0.9, top_k=3, draws=40_000)
    expected = torch.softmax(logits[0, :3] / 0.9, dim=0)
    observed = torch.bincount(codes, minlength=6).float() / len(codes)
    assert observed[3:].sum() == 0, "nothing outside the top-k, never a masked code"
    assert torch.allclose(observed[:3], expected, atol=0.01)


def test_greedy_rows_take_the_argmax_whatever_the_noise():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    codes = sample(logits, torch.ones(2), torch.full((2,), 3), torch.tensor([True, True]), torch.rand(2, 3))
    assert codes.tolist() == [1, 0]


def test_same_seed_same_draws():
    logits = torch.randn(1, 50)
    assert torch.equal(draw(logits, 1.0, 50, 20, seed=3), draw(logits, 1.0, 50, 20, seed=3))
    assert not torch.equal(draw(logits, 1.0, 50, 20, seed=3), draw(logits, 1.0, 50, 20, seed=4))


def test_a_top_k_bound_draws_exactly_what_the_whole_vocabulary_draws():
    # The engine finds the k-th score with torch.topk over `top_k_bound` candidates
    # instead of sorting all 2051: same codes, for every row, greedy or sampled.
    torch.manual_seed(0)
    rows, vocab = 32, 2051
    logits = torch.randn(rows, vocab) * 3
    logits[:, 2048:] = float("-inf")  # the LM's specials
    top_k = torch.randint(1, 65, (rows,))
    temperature = torch.rand(rows) + 0.5
    greedy = torch.arange(rows) % 5 == 0
    noise = torch.empty(rows, vocab).exponential_()
    whole = sample(logits, temperature, top_k, greedy, noise)
    assert torch.equal(sample(logits, temperature, top_k, greedy, noise, top_k_bound=64), whole)
    assert torch.equal(sample(logits, temperature, top_k, greedy, noise, top_k_bound=2048), whole)
