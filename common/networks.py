"""Generic networks: layer init, MLP builder, a 64x64 conv encoder and transposed-conv decoder."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn


def layer_init(layer: nn.Module, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    """Orthogonal weights with gain `std` and constant bias, as in CleanRL."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


def mlp(
    in_dim: int,
    hidden_sizes: Sequence[int],
    out_dim: int,
    activation: type[nn.Module] = nn.ReLU,
    output_activation: type[nn.Module] | None = None,
) -> nn.Sequential:
    """Linear -> activation for each hidden size, then a final Linear to `out_dim` (and `output_activation`)."""
    sizes = [in_dim, *hidden_sizes]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), activation()]
    layers.append(nn.Linear(sizes[-1], out_dim))
    if output_activation is not None:
        layers.append(output_activation())
    return nn.Sequential(*layers)


class ConvEncoder(nn.Module):
    """Dreamer/PlaNet encoder: four 4x4 stride-2 convolutions (depth x 1, 2, 4, 8), 64x64 -> 8 * depth * 2 * 2.

    Input: images (..., C, 64, 64) as floats (scale them first, e.g. to [-0.5, 0.5]).
    With depth 32 the output has 1024 features. `final_activation=False` leaves the last convolution linear
    (ActSafe's encoder); Dreamer v1 and PlaNet apply the activation after every convolution.
    """

    def __init__(self, in_channels: int = 3, depth: int = 32, activation: type[nn.Module] = nn.ReLU,
                 final_activation: bool = True):
        super().__init__()
        d = depth
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, d, 4, 2), activation(),
            nn.Conv2d(d, 2 * d, 4, 2), activation(),
            nn.Conv2d(2 * d, 4 * d, 4, 2), activation(),
            nn.Conv2d(4 * d, 8 * d, 4, 2), *([activation()] if final_activation else []),
            nn.Flatten(),
        )  # fmt: skip
        self.out_dim = 8 * d * 2 * 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch_shape = images.shape[:-3]
        out = self.net(images.reshape(-1, *images.shape[-3:]))
        return out.reshape(*batch_shape, self.out_dim)


class ConvDecoder(nn.Module):
    """Dreamer/PlaNet decoder: features -> Linear(32 * depth) -> four transposed convs -> (C, 64, 64).

    Kernel sizes 5, 5, 6, 6 with stride 2 map 1x1 -> 5 -> 13 -> 30 -> 64. Returns the image mean.
    """

    def __init__(self, in_dim: int, out_channels: int = 3, depth: int = 32, activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        d = depth
        self.linear = nn.Linear(in_dim, 32 * d)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(32 * d, 4 * d, 5, 2), activation(),
            nn.ConvTranspose2d(4 * d, 2 * d, 5, 2), activation(),
            nn.ConvTranspose2d(2 * d, d, 6, 2), activation(),
            nn.ConvTranspose2d(d, out_channels, 6, 2),
        )  # fmt: skip
        self.out_channels = out_channels

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch_shape = features.shape[:-1]
        x = self.linear(features.reshape(-1, features.shape[-1]))
        out = self.net(x[:, :, None, None])
        return out.reshape(*batch_shape, self.out_channels, 64, 64)
