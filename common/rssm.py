"""A recurrent state-space model (RSSM, Hafner et al. 2019, PlaNet / Dreamer v1) whose transition prior is an ensemble.

The latent state is s_t = (h_t, z_t): a deterministic GRU state h_t and a Gaussian stochastic state z_t.

    h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}])                      deterministic path, shared by all members
    p_e(z_t | h_t) = N(mu_e(h_t), sigma_e(h_t)),  e = 1..E       the transition prior: an ensemble of E heads
    q(z_t | h_t, embed(o_t)) = N(mu_q, sigma_q)                  the posterior (filter), one for all members

Standard deviations are softplus(.) + min_std. The E prior heads are one batched layer (`EnsembleLinear`,
weights of shape (E, in, out), a single `baddbmm`): no Python loop over members or over the batch. The only loop
is over time in `observe`, which a recurrent filter cannot avoid.

Members start from the same initialisation plus small Gaussian jitter (`init_jitter`), as in ActSafe's code.
Every step draws ONE member (uniformly, on the host, so no device sync) whose statistics are returned as "the"
prior (and, in `img_step`, whose sample continues the rollout); the statistics of ALL members are returned too
(`ens_mean`, `ens_std` with shape (E, N, stoch)) for whoever needs the disagreement. What a script does with the
disagreement (an uncertainty, an intrinsic reward, a pessimistic cost) is not this module's business.

States are plain dicts of tensors: {"deter": (N, D), "stoch": (N, S), "mean": (N, S), "std": (N, S)}, and
`observe` stacks them along a time axis: (B, T, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class EnsembleLinear(nn.Module):
    """E independent linear layers applied at once: (E, N, in) or (N, in) -> (E, N, out).

    All members are initialised to the same weights (PyTorch's default Linear init) plus N(0, init_jitter^2) noise.
    """

    def __init__(self, ensemble_size: int, in_dim: int, out_dim: int, init_jitter: float = 0.01):
        super().__init__()
        base = nn.Linear(in_dim, out_dim)
        weight = base.weight.detach().t().unsqueeze(0).repeat(ensemble_size, 1, 1)  # (E, in, out)
        bias = base.bias.detach().unsqueeze(0).repeat(ensemble_size, 1)  # (E, out)
        self.weight = nn.Parameter(weight + init_jitter * torch.randn_like(weight))
        self.bias = nn.Parameter(bias + init_jitter * torch.randn_like(bias))
        self.ensemble_size, self.in_dim, self.out_dim = ensemble_size, in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # the same input for every member
            x = x.unsqueeze(0).expand(self.ensemble_size, -1, -1)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)


def gaussian_kl(mean_q: torch.Tensor, std_q: torch.Tensor, mean_p: torch.Tensor, std_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_q, std_q) || N(mean_p, std_p)) of diagonal Gaussians, summed over the last axis."""
    var_q, var_p = std_q.pow(2), std_p.pow(2)
    kl = torch.log(std_p / std_q) + (var_q + (mean_q - mean_p).pow(2)) / (2 * var_p) - 0.5
    return kl.sum(-1)


def balanced_kl_loss(post: dict, prior: dict, balance: float = 0.8, free_nats: float = 1.0):
    """KL balancing (Hafner et al. 2021, DreamerV2): balance * KL(sg(q) || p) + (1 - balance) * KL(q || sg(p)).

    Free nats are applied to the batch mean of each term (max(mean KL, free_nats)). Returns (loss, mean KL value).
    """
    kl_prior = gaussian_kl(post["mean"].detach(), post["std"].detach(), prior["mean"], prior["std"]).mean()
    kl_post = gaussian_kl(post["mean"], post["std"], prior["mean"].detach(), prior["std"].detach()).mean()
    # eq. KL balancing: a max(KL(sg(q) || p), free) + (1 - a) max(KL(q || sg(p)), free)
    loss = balance * kl_prior.clamp(min=free_nats) + (1 - balance) * kl_post.clamp(min=free_nats)
    return loss, kl_prior.detach()


class RSSM(nn.Module):
    """RSSM with a shared GRU and posterior and an ensemble of `ensemble_size` transition priors."""

    def __init__(
        self,
        action_dim: int,
        embed_dim: int,
        deter_dim: int = 200,
        stoch_dim: int = 60,
        hidden_dim: int = 200,
        ensemble_size: int = 5,
        min_std: float = 0.1,
        init_jitter: float = 0.01,
        activation: type[nn.Module] = nn.ELU,
    ):
        super().__init__()
        if ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}")
        self.deter_dim, self.stoch_dim, self.ensemble_size, self.min_std = deter_dim, stoch_dim, ensemble_size, min_std
        self.img_in = nn.Sequential(nn.Linear(stoch_dim + action_dim, hidden_dim), activation())
        self.gru = nn.GRUCell(hidden_dim, deter_dim)
        # the transition prior: deter -> hidden -> (mean, std) for each of the E members
        self.prior_hidden = EnsembleLinear(ensemble_size, deter_dim, hidden_dim, init_jitter)
        self.prior_out = EnsembleLinear(ensemble_size, hidden_dim, 2 * stoch_dim, init_jitter)
        self.prior_act = activation()
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

    def initial(self, batch_size: int, device: torch.device | str = "cpu") -> dict:
        zeros = lambda d: torch.zeros(batch_size, d, device=device)  # noqa: E731
        return {"deter": zeros(self.deter_dim), "stoch": zeros(self.stoch_dim),
                "mean": zeros(self.stoch_dim), "std": torch.ones(batch_size, self.stoch_dim, device=device)}

    def _stats(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = out.chunk(2, -1)
        return mean, F.softplus(std) + self.min_std

    def sample_member(self) -> int:
        """A uniformly drawn member index, drawn on the host from torch's global generator."""
        return int(torch.randint(self.ensemble_size, ()).item())

    def ensemble_prior(self, deter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All members' prior statistics for deterministic states (N, D): mean and std of shape (E, N, S)."""
        return self._stats(self.prior_out(self.prior_act(self.prior_hidden(deter))))

    def img_step(self, state: dict, action: torch.Tensor, member: int | None = None) -> dict:
        """One step of the prior: h_t from (h_{t-1}, z_{t-1}, a_{t-1}); z_t sampled from member `member`."""
        x = self.img_in(torch.cat([state["stoch"], action], -1))
        deter = self.gru(x, state["deter"])  # eq. RSSM: h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}])
        ens_mean, ens_std = self.ensemble_prior(deter)
        member = self.sample_member() if member is None else member
        mean, std = ens_mean[member], ens_std[member]
        stoch = mean + std * torch.randn_like(std)  # eq. RSSM prior: z_t ~ p_e(z_t | h_t), member e
        return {"deter": deter, "stoch": stoch, "mean": mean, "std": std, "ens_mean": ens_mean, "ens_std": ens_std}

    def obs_step(self, state: dict, action: torch.Tensor, embed: torch.Tensor, member: int | None = None):
        """One filtering step: the prior as in `img_step`, then the posterior given the observation's embedding."""
        prior = self.img_step(state, action, member)
        # eq. RSSM posterior: z_t ~ q(z_t | h_t, embed(o_t))
        mean, std = self._stats(self.post_net(torch.cat([prior["deter"], embed], -1)))
        post = {"deter": prior["deter"], "stoch": mean + std * torch.randn_like(std), "mean": mean, "std": std}
        return post, prior

    def observe(self, embeds: torch.Tensor, actions: torch.Tensor, state: dict | None = None):
        """Filter a batch of sequences: embeds (B, T, embed), actions (B, T, A) with actions[:, t] = a_{t-1}.

        Each step draws its own member for the prior. Returns (posts, priors), dicts of (B, T, ...) tensors
        (the priors also hold `ens_mean`/`ens_std` of shape (B, T, E, S)).
        """
        batch, steps = embeds.shape[:2]
        state = self.initial(batch, embeds.device) if state is None else state
        posts, priors = [], []
        for t in range(steps):
            state, prior = self.obs_step(state, actions[:, t], embeds[:, t])
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
