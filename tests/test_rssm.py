"""Unit tests of common/rssm.py: the batched ensemble layers, whole-prior members, their initialisation and draws,
the Gaussian KL, KL balancing, the filter, and the one-member RSSM against a plain RSSM step computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from common.rssm import RSSM, EnsembleGRUCell, EnsembleLinear, balanced_kl_loss, gaussian_kl, prior_parameter_std

SMALL = dict(action_dim=2, embed_dim=8, deter_dim=16, stoch_dim=4, hidden_dim=16)


def test_ensemble_linear_matches_a_loop_over_members():
    torch.manual_seed(0)
    layer = EnsembleLinear(4, 3, 5)
    with torch.no_grad():
        layer.weight.add_(0.1 * torch.randn_like(layer.weight))
    x = torch.randn(4, 7, 3)
    expected = torch.stack([x[e] @ layer.weight[e] + layer.bias[e] for e in range(4)])
    torch.testing.assert_close(layer(x), expected)
    # a shared (N, in) input is given to every member
    shared = torch.randn(7, 3)
    torch.testing.assert_close(layer(shared), torch.stack([shared @ layer.weight[e] + layer.bias[e] for e in range(4)]))


def test_ensemble_gru_cell_matches_torch_gru_cells():
    torch.manual_seed(0)
    cell = EnsembleGRUCell(3, 5, 6)
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(0.1 * torch.randn_like(p))  # three different members
    x, h = torch.randn(3, 4, 5), torch.randn(3, 4, 6)
    out = cell(x, h)
    for e in range(3):
        ref = torch.nn.GRUCell(5, 6)
        with torch.no_grad():
            ref.weight_ih.copy_(cell.weight_ih[e].t())
            ref.weight_hh.copy_(cell.weight_hh[e].t())
            ref.bias_ih.copy_(cell.bias_ih[e])
            ref.bias_hh.copy_(cell.bias_hh[e])
        torch.testing.assert_close(out[e], ref(x[e], h[e]))
    # a shared input and state are given to every member
    torch.testing.assert_close(cell(x[0], h[0])[1], cell(x[0].expand(3, -1, -1), h[0].expand(3, -1, -1))[1])


def test_two_members_give_different_deterministic_states_for_the_same_input():
    torch.manual_seed(0)
    rssm = RSSM(**SMALL, ensemble_size=2)
    state = {"deter": torch.randn(3, 16), "stoch": torch.randn(3, 4)}
    out = rssm.img_step(state, torch.randn(3, 2), member=0)
    assert out["ens_deter"].shape == (2, 3, 16)
    assert (out["ens_deter"][0] - out["ens_deter"][1]).abs().max() > 1e-2  # each member has its own GRU path
    assert (out["ens_mean"][0] - out["ens_mean"][1]).abs().max() > 1e-2


def test_default_jitter_is_the_std_of_one_priors_initial_parameters():
    # ActSafe's rule; computed independently: PyTorch's Linear and GRUCell draw uniform(-1/sqrt(k), 1/sqrt(k)) with
    # k the fan-in (Linear) or the hidden size (GRUCell), variance 1/(3k); the parameters' std pools them.
    S, A, D, H = 60, 2, 200, 200
    groups = [((S + A) * H + H, S + A), (2 * 3 * D * H + 2 * 3 * D, D), (D * H + H, D), (H * 2 * S + 2 * S, H)]
    n = sum(count for count, _ in groups)
    expected = math.sqrt(sum(count / (3 * k) for count, k in groups) / n)
    torch.manual_seed(0)
    rssm = RSSM(action_dim=A, embed_dim=1024, deter_dim=D, stoch_dim=S, hidden_dim=H, ensemble_size=5)
    assert rssm.init_jitter == pytest.approx(expected, rel=0.02)
    assert 0.035 < rssm.init_jitter < 0.05  # "about 0.043 at these sizes" (the issue)
    assert RSSM(**SMALL, ensemble_size=1).init_jitter == 0.0  # one member: no jitter, as the authors
    assert RSSM(**SMALL, ensemble_size=3, init_jitter=0.01).init_jitter == 0.01


def test_jitter_goes_to_the_linear_layers_not_the_gru_cells():
    torch.manual_seed(0)
    rssm = RSSM(**SMALL, ensemble_size=5, init_jitter=0.05)
    for name, p in rssm.prior.named_parameters():
        spread = (p - p.mean(0, keepdim=True)).std().item()
        if name.startswith("gru."):
            assert all(torch.equal(p[0], p[e]) for e in range(5)), name  # copies of one GRUCell initialisation
        else:
            assert spread == pytest.approx(0.05 * math.sqrt(4 / 5), rel=0.25), name  # N(0, 0.05^2) per member
    # before jitter the members were copies: prior_parameter_std reads member 0 of an un-jittered prior
    assert prior_parameter_std(RSSM(**SMALL, ensemble_size=1).prior) > 0


def test_member_draws_are_on_the_device_reproducible_and_not_fixed():
    rssm = RSSM(**SMALL, ensemble_size=5)
    torch.manual_seed(3)
    a = rssm.draw_members(200, "cpu")
    torch.manual_seed(3)
    b = rssm.draw_members(200, "cpu")
    assert a.dtype == torch.long and a.device.type == "cpu" and torch.equal(a, b)
    assert set(a.tolist()) == {0, 1, 2, 3, 4}  # every member drawn over many steps, not one fixed member
    assert torch.equal(RSSM(**SMALL, ensemble_size=1).draw_members(7, "cpu"), torch.zeros(7, dtype=torch.long))


def test_the_drawn_members_whole_state_continues():
    torch.manual_seed(0)
    rssm = RSSM(**SMALL, ensemble_size=3)
    state = {"deter": torch.randn(5, 16), "stoch": torch.randn(5, 4)}
    step = rssm.img_step(state, torch.zeros(5, 2), member=torch.tensor(2))
    for k in ("deter", "stoch", "mean", "std"):
        torch.testing.assert_close(step[k], step[f"ens_{k}"][2])
    assert RSSM.features(step).shape == (5, 20) and RSSM.member_features(step).shape == (3, 5, 20)
    assert (step["ens_std"] >= 0.1).all()  # softplus + min_std


def test_one_member_rssm_is_a_plain_rssm_step_by_hand():
    torch.manual_seed(0)
    rssm = RSSM(**SMALL, ensemble_size=1)
    p = {k: v[0] for k, v in rssm.prior.state_dict().items()}
    h0, z0, a, embed = torch.randn(3, 16), torch.randn(3, 4), torch.randn(3, 2), torch.randn(3, 8)
    # the plain RSSM, written out: x = elu(W [z, a] + b); h = GRU(x, h0); (mu, s) = W2 elu(W1 h + b1) + b2
    x = F.elu(torch.cat([z0, a], -1) @ p["img_in.weight"] + p["img_in.bias"])
    gi, gh = x @ p["gru.weight_ih"] + p["gru.bias_ih"], h0 @ p["gru.weight_hh"] + p["gru.bias_hh"]
    r = torch.sigmoid(gi[:, :16] + gh[:, :16])
    u = torch.sigmoid(gi[:, 16:32] + gh[:, 16:32])
    n = torch.tanh(gi[:, 32:] + r * gh[:, 32:])
    h = (1 - u) * n + u * h0
    out = F.elu(h @ p["hidden.weight"] + p["hidden.bias"]) @ p["out.weight"] + p["out.bias"]
    mean, std = out[:, :4], F.softplus(out[:, 4:]) + 0.1
    post_out = rssm.post_net(torch.cat([h, embed], -1))
    torch.manual_seed(1)
    post, prior = rssm.obs_step({"deter": h0, "stoch": z0}, a, embed)
    torch.testing.assert_close(prior["deter"], h)
    torch.testing.assert_close(prior["mean"], mean)
    torch.testing.assert_close(prior["std"], std)
    torch.testing.assert_close(post["mean"], post_out[:, :4])
    torch.testing.assert_close(post["std"], F.softplus(post_out[:, 4:]) + 0.1)
    torch.manual_seed(1)  # one member draws nothing: the prior noise is the first draw of the generator
    torch.testing.assert_close(prior["stoch"], mean + std * torch.randn(3, 4))


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
    rssm = RSSM(**SMALL, ensemble_size=3)
    posts, priors = rssm.observe(torch.randn(5, 7, 8), torch.randn(5, 7, 2))
    assert posts["deter"].shape == (5, 7, 16) and posts["stoch"].shape == (5, 7, 4)
    assert priors["ens_mean"].shape == (5, 7, 3, 4)
    # the prior's statistics are those of one of the members, the same member for the whole batch at each step
    match = (priors["ens_mean"] - priors["mean"].unsqueeze(2)).abs().amax(-1) < 1e-6  # (B, T, E)
    assert match.any(-1).all()
    assert (match == match[:1]).all()
    torch.testing.assert_close(posts["deter"], priors["deter"])  # the posterior keeps the drawn member's h


def test_rssm_rejects_empty_ensemble():
    with pytest.raises(ValueError, match="ensemble_size"):
        RSSM(action_dim=2, embed_dim=8, ensemble_size=0)
