"""A recurrent state-space model (RSSM, Hafner et al. 2019, PlaNet / Dreamer v1) whose transition prior is an ensemble.

The latent state is s_t = (h_t, z_t): a deterministic GRU state h_t and a Gaussian stochastic state z_t.

    h_t^e = GRU_e(h_{t-1}, [z_{t-1}, a_{t-1}])                  member e's deterministic step (its own GRU cell)
    p_e(z_t | h_t^e) = N(mu_e(h_t^e), sigma_e(h_t^e)),  e = 1..E  member e's stochastic state
    q(z_t | h_t, embed(o_t)) = N(mu_q, sigma_q)                  the posterior (filter), one for all members

Each member is a WHOLE transition prior (input layer, GRU cell, output head), as in ActSafe's code: all members
step from the same state (h_{t-1}, z_{t-1}), and one drawn member's full state (h_t^e and its z_t) continues.
With E = 1 this is a plain RSSM. Standard deviations are softplus(.) + min_std. The members are batched
(`EnsembleLinear`, `EnsembleGRUCell`: weights with a leading member axis, one `baddbmm` per layer): no Python loop
over members or over the batch. The only loop is over time, which a recurrent filter cannot avoid.

Initialisation (ActSafe's `jitter_priors`): one prior is initialised as PyTorch initialises its layers, every member
starts as a copy of it, and the members' LINEAR layers (not the GRU cells) get Gaussian jitter whose std is, by
default, the std of all of that prior's initial parameters (`prior_parameter_std`, about 0.043 at the default sizes).

Member draws happen on the device (`torch.randint(..., device=...)`, then `index_select`): no host sync and no
host-side randomness, so a compiled / CUDA-graph-captured update still draws a fresh member at every step, and a
seeded run reproduces its draws. What a script does with the members' disagreement (an uncertainty, an intrinsic
reward, a pessimistic cost) is not this module's business.

States are plain dicts of tensors: {"deter": (N, D), "stoch": (N, S), "mean": (N, S), "std": (N, S)}; `img_step`
adds the members' own "ens_deter" (E, N, D), "ens_stoch", "ens_mean", "ens_std" (E, N, S). `observe` stacks states
along a time axis: (B, T, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class EnsembleLinear(nn.Module):
    """E linear layers applied at once: (E, N, in) or (N, in) -> (E, N, out).

    Every member starts from the same draw of PyTorch's default Linear initialisation (jitter is added by the RSSM).
    """

    def __init__(self, ensemble_size: int, in_dim: int, out_dim: int):
        super().__init__()
        base = nn.Linear(in_dim, out_dim)
        self.weight = nn.Parameter(base.weight.detach().t().unsqueeze(0).repeat(ensemble_size, 1, 1))  # (E, in, out)
        self.bias = nn.Parameter(base.bias.detach().unsqueeze(0).repeat(ensemble_size, 1))  # (E, out)
        self.ensemble_size, self.in_dim, self.out_dim = ensemble_size, in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # the same input for every member
            x = x.unsqueeze(0).expand(self.ensemble_size, -1, -1)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)


class EnsembleGRUCell(nn.Module):
    """E GRU cells with PyTorch's `nn.GRUCell` equations, applied at once.

    x: (E, N, in) or (N, in); h: (E, N, H) or (N, H) -> (E, N, H). Members start from the same GRUCell draw.
    """

    def __init__(self, ensemble_size: int, in_dim: int, hidden_dim: int):
        super().__init__()
        base = nn.GRUCell(in_dim, hidden_dim)
        rep = lambda w: nn.Parameter(w.detach().unsqueeze(0).repeat(ensemble_size, *[1] * w.dim()))  # noqa: E731
        self.weight_ih, self.weight_hh = rep(base.weight_ih.t()), rep(base.weight_hh.t())  # (E, in, 3H), (E, H, 3H)
        self.bias_ih, self.bias_hh = rep(base.bias_ih), rep(base.bias_hh)  # (E, 3H)
        self.ensemble_size = ensemble_size

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        expand = lambda t: t.unsqueeze(0).expand(self.ensemble_size, -1, -1) if t.dim() == 2 else t  # noqa: E731
        x, h = expand(x), expand(h)
        i_r, i_z, i_n = torch.baddbmm(self.bias_ih.unsqueeze(1), x, self.weight_ih).chunk(3, -1)
        h_r, h_z, h_n = torch.baddbmm(self.bias_hh.unsqueeze(1), h, self.weight_hh).chunk(3, -1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)  # reset and update gates
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h


class EnsemblePrior(nn.Module):
    """E whole transition priors: [z_{t-1}, a_{t-1}] -> Linear -> GRU_e(h_{t-1}) -> h_t^e -> Linear -> (mu_e, sigma_e)."""

    def __init__(self, ensemble_size, action_dim, deter_dim, stoch_dim, hidden_dim, min_std, activation):
        super().__init__()
        self.img_in = EnsembleLinear(ensemble_size, stoch_dim + action_dim, hidden_dim)
        self.gru = EnsembleGRUCell(ensemble_size, hidden_dim, deter_dim)
        self.hidden = EnsembleLinear(ensemble_size, deter_dim, hidden_dim)
        self.out = EnsembleLinear(ensemble_size, hidden_dim, 2 * stoch_dim)
        self.act, self.min_std = activation(), min_std

    def forward(self, stoch: torch.Tensor, action: torch.Tensor, deter: torch.Tensor):
        """From one state (N, ...) for all members: h_t^e (E, N, D), mean_e and std_e (E, N, S)."""
        x = self.act(self.img_in(torch.cat([stoch, action], -1)))
        ens_deter = self.gru(x, deter)  # eq. RSSM: h_t^e = GRU_e(h_{t-1}, [z_{t-1}, a_{t-1}])
        mean, std = self.out(self.act(self.hidden(ens_deter))).chunk(2, -1)
        return ens_deter, mean, F.softplus(std) + self.min_std

    def linear_layers(self) -> list[EnsembleLinear]:
        return [self.img_in, self.hidden, self.out]


def prior_parameter_std(prior: EnsemblePrior) -> float:
    """The std of all initial parameters of ONE member (before jitter): ActSafe's default jitter scale
    (`model_initialization_scale: null` -> `ravel_pytree(dummy_prior)[0].std()`)."""
    return torch.cat([p.detach()[0].flatten() for p in prior.parameters()]).std().item()


def gaussian_kl(mean_q: torch.Tensor, std_q: torch.Tensor, mean_p: torch.Tensor, std_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_q, std_q) || N(mean_p, std_p)) of diagonal Gaussians, summed over the last axis."""
    var_q, var_p = std_q.pow(2), std_p.pow(2)
    kl = torch.log(std_p / std_q) + (var_q + (mean_q - mean_p).pow(2)) / (2 * var_p) - 0.5
    return kl.sum(-1)


def balanced_kl_loss(post: dict, prior: dict, balance: float = 0.8, free_nats: float = 1.0):
    """KL balancing (Hafner et al. 2021, DreamerV2): balance * KL(sg(q) || p) + (1 - balance) * KL(q || sg(p)).

    Free nats are applied to the batch mean of each term (max(mean KL, free_nats)). Returns (loss, mean KL value).
    (PlaNet / Dreamer v1 use the plain max(KL(q || p), free_nats): `gaussian_kl` directly; balance 0.5 would give the
    same value but half its gradient.)
    """
    kl_prior = gaussian_kl(post["mean"].detach(), post["std"].detach(), prior["mean"], prior["std"]).mean()
    kl_post = gaussian_kl(post["mean"], post["std"], prior["mean"].detach(), prior["std"].detach()).mean()
    # eq. KL balancing: a max(KL(sg(q) || p), free) + (1 - a) max(KL(q || sg(p)), free)
    loss = balance * kl_prior.clamp(min=free_nats) + (1 - balance) * kl_post.clamp(min=free_nats)
    return loss, kl_prior.detach()


class RSSM(nn.Module):
    """RSSM with an ensemble of `ensemble_size` whole transition priors and one shared posterior."""

    def __init__(
        self,
        action_dim: int,
        embed_dim: int,
        deter_dim: int = 200,
        stoch_dim: int = 60,
        hidden_dim: int = 200,
        ensemble_size: int = 5,
        min_std: float = 0.1,
        init_jitter: float | None = None,
        activation: type[nn.Module] = nn.ELU,
    ):
        super().__init__()
        if ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}")
        self.deter_dim, self.stoch_dim, self.ensemble_size, self.min_std = deter_dim, stoch_dim, ensemble_size, min_std
        self.prior = EnsemblePrior(ensemble_size, action_dim, deter_dim, stoch_dim, hidden_dim, min_std, activation)
        # the members' jitter: ActSafe's rule (the std of one prior's initial parameters) unless given; none for E = 1
        scale = prior_parameter_std(self.prior) if init_jitter is None else init_jitter
        self.init_jitter = scale if ensemble_size > 1 else 0.0
        with torch.no_grad():
            for layer in self.prior.linear_layers():  # the authors jitter the Linear layers, not the GRU cells
                layer.weight.add_(self.init_jitter * torch.randn_like(layer.weight))
                layer.bias.add_(self.init_jitter * torch.randn_like(layer.bias))
        # the posterior: [deter, embed] -> hidden -> (mean, std)
        self.post_net = nn.Sequential(
            nn.Linear(deter_dim + embed_dim, hidden_dim), activation(), nn.Linear(hidden_dim, 2 * stoch_dim)
        )

    @property
    def feature_dim(self) -> int:
        return self.deter_dim + self.stoch_dim

    @staticmethod
    def features(state: dict) -> torch.Tensor:
        """The model state as one vector [z_t, h_t], input of the decoder, heads, actor and critics."""
        return torch.cat([state["stoch"], state["deter"]], -1)

    @staticmethod
    def member_features(state: dict) -> torch.Tensor:
        """Every member's own next state [z_t^e, h_t^e] after an `img_step`: (E, N, S + D)."""
        return torch.cat([state["ens_stoch"], state["ens_deter"]], -1)

    def initial(self, batch_size: int, device: torch.device | str = "cpu") -> dict:
        zeros = lambda d: torch.zeros(batch_size, d, device=device)  # noqa: E731
        return {"deter": zeros(self.deter_dim), "stoch": zeros(self.stoch_dim),
                "mean": zeros(self.stoch_dim), "std": torch.ones(batch_size, self.stoch_dim, device=device)}

    def draw_members(self, steps: int, device: torch.device | str) -> torch.Tensor:
        """`steps` member indices drawn uniformly ON THE DEVICE from torch's seeded generator: (steps,) long.

        One member per step for the whole batch, as in ActSafe's code. With one member: zeros, no draw.
        """
        if self.ensemble_size == 1:
            return torch.zeros(steps, dtype=torch.long, device=device)
        return torch.randint(self.ensemble_size, (steps,), device=device)

    def img_step(self, state: dict, action: torch.Tensor, member: torch.Tensor | int | None = None) -> dict:
        """One step of the prior: every member steps from (h_{t-1}, z_{t-1}, a_{t-1}); member `member` continues.

        `member`: a 0-d or (1,) long tensor on the state's device (or an int; drawn on the device when None).
        """
        ens_deter, ens_mean, ens_std = self.prior(state["stoch"], action, state["deter"])
        ens_stoch = ens_mean + ens_std * torch.randn_like(ens_std)  # eq. RSSM prior: z_t^e ~ p_e(z_t | h_t^e)
        if member is None:
            member = self.draw_members(1, ens_deter.device)
        member = torch.as_tensor(member, device=ens_deter.device).reshape(1)
        pick = lambda x: x.index_select(0, member).squeeze(0)  # noqa: E731  (a gather: no host sync)
        return {"deter": pick(ens_deter), "stoch": pick(ens_stoch), "mean": pick(ens_mean), "std": pick(ens_std),
                "ens_deter": ens_deter, "ens_stoch": ens_stoch, "ens_mean": ens_mean, "ens_std": ens_std}

    def obs_step(self, state: dict, action: torch.Tensor, embed: torch.Tensor, member=None):
        """One filtering step: the drawn member's prior as in `img_step`, then the posterior given the embedding."""
        prior = self.img_step(state, action, member)
        # eq. RSSM posterior: z_t ~ q(z_t | h_t, embed(o_t)), h_t the drawn member's
        mean, std = self.post_net(torch.cat([prior["deter"], embed], -1)).chunk(2, -1)
        std = F.softplus(std) + self.min_std
        post = {"deter": prior["deter"], "stoch": mean + std * torch.randn_like(std), "mean": mean, "std": std}
        return post, prior

    def observe(self, embeds: torch.Tensor, actions: torch.Tensor, state: dict | None = None):
        """Filter a batch of sequences: embeds (B, T, embed), actions (B, T, A) with actions[:, t] = a_{t-1}.

        Each step draws its own member (all T draws at once, on the device) for the prior. Returns (posts, priors),
        dicts of (B, T, ...) tensors; the priors also hold the members' `ens_mean`/`ens_std` of shape (B, T, E, S).
        """
        batch, steps = embeds.shape[:2]
        state = self.initial(batch, embeds.device) if state is None else state
        members = self.draw_members(steps, embeds.device)
        posts, priors = [], []
        for t in range(steps):
            state, prior = self.obs_step(state, actions[:, t], embeds[:, t], members[t])
            posts.append(state)
            priors.append(prior)
        stack = lambda seq, k, dim: torch.stack([s[k] for s in seq], dim)  # noqa: E731
        priors_list = priors
        posts = {k: stack(posts, k, 1) for k in posts[0]}
        priors = {k: stack(priors, k, 1) for k in ("deter", "stoch", "mean", "std")}
        for k in ("ens_mean", "ens_std"):  # (T, E, B, S) -> (B, T, E, S)
            priors[k] = stack(priors_list, k, 0).permute(2, 0, 1, 3)
        return posts, priors


def num_parameters(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
