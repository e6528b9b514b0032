"""common/networks.py: MLP builder, layer init, conv encoder/decoder shapes."""

import math

import torch
import torch.nn as nn

from common import ConvDecoder, ConvEncoder, layer_init, mlp


def test_mlp_structure_and_shapes():
    net = mlp(7, [32, 16], 3, activation=nn.Tanh, output_activation=nn.Tanh)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(7, 32), (32, 16), (16, 3)]
    assert sum(isinstance(m, nn.Tanh) for m in net) == 3
    out = net(torch.randn(5, 7) * 100)
    assert out.shape == (5, 3) and out.abs().max() <= 1.0
    assert mlp(4, [], 2)(torch.zeros(1, 4)).shape == (1, 2)  # no hidden layer = one Linear


def test_layer_init_is_orthogonal_with_gain():
    layer = layer_init(nn.Linear(16, 16), std=2.0, bias_const=0.5)
    w = layer.weight.detach()
    torch.testing.assert_close(w @ w.T, 4.0 * torch.eye(16), atol=1e-5, rtol=0)
    assert torch.all(layer.bias == 0.5)
    default = layer_init(nn.Linear(8, 8)).weight.detach()
    torch.testing.assert_close(default @ default.T, 2.0 * torch.eye(8), atol=1e-5, rtol=0)  # gain sqrt(2)
    assert math.isclose(float(default.norm() ** 2), 16.0, rel_tol=1e-5)


def test_conv_encoder_and_decoder_shapes_with_batch_dims():
    enc, dec = ConvEncoder(depth=32), ConvDecoder(in_dim=230, depth=32)
    assert enc.out_dim == 1024
    x = torch.rand(2, 5, 3, 64, 64) - 0.5
    assert enc(x).shape == (2, 5, 1024)
    assert dec(torch.randn(2, 5, 230)).shape == (2, 5, 3, 64, 64)
    small = ConvEncoder(depth=4)
    assert small(x[0]).shape == (5, small.out_dim) and small.out_dim == 128


def test_encoder_decoder_can_fit_an_image():
    """The pair is a working autoencoder: 150 Adam steps cut the reconstruction error of one image by 10x."""
    torch.manual_seed(0)
    enc, dec = ConvEncoder(depth=8), ConvDecoder(in_dim=256, depth=8)
    img = torch.zeros(1, 3, 64, 64)
    img[:, 0, 16:48, 16:48] = 0.5
    img[:, 2, :, :8] = -0.5
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
    first = None
    for _ in range(150):
        loss = ((dec(enc(img)) - img) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10
