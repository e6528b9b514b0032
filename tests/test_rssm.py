"""Unit tests of common/rssm.py: the batched ensemble layer, the Gaussian KL, KL balancing, shapes of the filter."""

import pytest
import torch

from common.rssm import RSSM, EnsembleLinear, balanced_kl_loss, gaussian_kl


def test_ensemble_linear_matches_a_loop_over_members():
    torch.manual_seed(0)
    layer = EnsembleLinear(4, 3, 5, init_jitter=0.1)
    x = torch.randn(4, 7, 3)
    expected = torch.stack([x[e] @ layer.weight[e] + layer.bias[e] for e in range(4)])
    torch.testing.assert_close(layer(x), expected)
    # a shared (N, in) input is given to every member
    shared = torch.randn(7, 3)
    torch.testing.assert_close(layer(shared), torch.stack([shared @ layer.weight[e] + layer.bias[e] for e in range(4)]))


def test_ensemble_members_differ_but_share_the_initialisation():
    torch.manual_seed(0)
    layer = EnsembleLinear(5, 20, 10, init_jitter=0.01)
    diffs = layer.weight - layer.weight.mean(0, keepdim=True)
    assert diffs.abs().max() > 1e-3  # the members are not copies of each other
    assert diffs.std() < 0.02  # ... but close to one common initialisation (jitter 0.01)
    rssm = RSSM(action_dim=2, embed_dim=8, deter_dim=16, stoch_dim=4, hidden_dim=16, ensemble_size=5)
    mean, std = rssm.ensemble_prior(torch.randn(3, 16))
    assert mean.shape == (5, 3, 4) and std.shape == (5, 3, 4)
    assert (mean[0] - mean[1]).abs().max() > 1e-4  # different members predict different means
    assert (std >= 0.1).all()  # softplus + min_std


def test_zero_jitter_gives_identical_members():
    torch.manual_seed(0)
    rssm = RSSM(action_dim=2, embed_dim=8, deter_dim=16, stoch_dim=4, hidden_dim=16, ensemble_size=3, init_jitter=0.0)
    mean, _ = rssm.ensemble_prior(torch.randn(3, 16))
    torch.testing.assert_close(mean[0], mean[2])


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mq, mp = torch.randn(6, 4), torch.randn(6, 4)
    sq, sp = torch.rand(6, 4) + 0.1, torch.rand(6, 4) + 0.1
    D = torch.distributions
    expected = D.kl_divergence(D.Independent(D.Normal(mq, sq), 1), D.Independent(D.Normal(mp, sp), 1))
    torch.testing.assert_close(gaussian_kl(mq, sq, mp, sp), expected)
    assert gaussian_kl(mq, sq, mq, sq).abs().max() < 1e-6


def test_balanced_kl_value_free_nats_and_gradient_split():
    mq = torch.zeros(2, 3, requires_grad=True)
    mp = torch.ones(2, 3, requires_grad=True)
    s = torch.ones(2, 3)
    post, prior = {"mean": mq, "std": s}, {"mean": mp, "std": s}
    # KL of unit Gaussians with means 0 and 1 in 3 dims: 3 * 0.5 = 1.5
    loss, kl = balanced_kl_loss(post, prior, balance=0.8, free_nats=0.0)
    assert kl.item() == pytest.approx(1.5)
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    # d/d mp of 0.8 * mean_n sum_d 0.5 (mq - mp)^2 = 0.8 * (mp - mq) / 2 (mean over the 2 rows)
    torch.testing.assert_close(mp.grad, torch.full((2, 3), 0.8 / 2))
    torch.testing.assert_close(mq.grad, torch.full((2, 3), -0.2 / 2))
    loss, _ = balanced_kl_loss(post, prior, balance=0.8, free_nats=2.0)
    assert loss.item() == pytest.approx(2.0)  # below the free nats: clamped (no gradient)


def test_observe_shapes_and_chosen_member():
    torch.manual_seed(0)
    rssm = RSSM(action_dim=2, embed_dim=8, deter_dim=16, stoch_dim=4, hidden_dim=16, ensemble_size=3)
    posts, priors = rssm.observe(torch.randn(5, 7, 8), torch.randn(5, 7, 2))
    assert posts["deter"].shape == (5, 7, 16) and posts["stoch"].shape == (5, 7, 4)
    assert priors["ens_mean"].shape == (5, 7, 3, 4)
    # the prior's statistics are those of one of the members, at every step
    match = (priors["ens_mean"] - priors["mean"].unsqueeze(2)).abs().amax(-1) < 1e-6  # (B, T, E)
    assert match.any(-1).all()
    state = rssm.initial(5)
    step = rssm.img_step(state, torch.zeros(5, 2), member=2)
    torch.testing.assert_close(step["mean"], step["ens_mean"][2])
    assert RSSM.features(step).shape == (5, 20)


def test_rssm_rejects_empty_ensemble():
    with pytest.raises(ValueError, match="ensemble_size"):
        RSSM(action_dim=2, embed_dim=8, ensemble_size=0)
