"""The original DnD hyper-convolutional decoder in PyTorch, written from the spec (§4.2-4.3).

A baseline for benchmarks (the same math the original runs, with torch.nn.Conv2d and permutes
as the original does) and an independent oracle for the Flax generator's tests.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn


class TorchHyperConvLayer(nn.Module):
    def __init__(self, fin, fout, k):
        super().__init__()
        (n, h, w), (n2, h2, w2) = fin, fout
        self.norm = nn.LayerNorm((h, w))
        self.conv_w1 = nn.Conv2d(w, w2, k, padding="same", bias=False)
        self.conv_h1 = nn.Conv2d(h, h2, k, padding="same", bias=False)
        self.conv_h2 = nn.Conv2d(h, h2, k, padding="same", bias=False)
        self.conv_w2 = nn.Conv2d(w, w2, k, padding="same", bias=False)
        self.bias = nn.Parameter(torch.empty(h2, w2).uniform_(-1 / (h2 * w2), 1 / (h2 * w2)))
        self.conv_l = nn.Conv2d(n, n2, k, padding="same", bias=True)
        self.residual = tuple(fin) == tuple(fout)

    @staticmethod
    def conv_w(conv, x):  # x [B, N, H, W]: channels W, spatial (H, N)
        return conv(x.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)

    @staticmethod
    def conv_h(conv, x):  # channels H, spatial (N, W)
        return conv(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)

    def forward(self, x):
        xn = self.norm(x)
        p1 = self.conv_h(self.conv_h1, self.conv_w(self.conv_w1, xn))
        p2 = torch.tanh(self.conv_w(self.conv_w2, self.conv_h(self.conv_h2, xn)))
        y = self.conv_l((p1 + p2 + self.bias) / 3)
        return x + y if self.residual else y


class TorchHyperConvDecoder(nn.Module):
    def __init__(self, features, k):
        super().__init__()
        self.layers = nn.ModuleList(TorchHyperConvLayer(a, b, k) for a, b in itertools.pairwise(features))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def load_from_flax(self, params: dict) -> None:
        """Copies weights from a Flax HyperConvDecoder's nnx.state (kernels [k, k, in, out])."""
        for i, layer in enumerate(self.layers):
            p = {k: np.asarray(v) for k, v in params["layers"][i].items()}
            with torch.no_grad():
                layer.norm.weight.copy_(torch.from_numpy(p["norm_scale"]))
                layer.norm.bias.copy_(torch.from_numpy(p["norm_bias"]))
                for name in ("conv_w1", "conv_h1", "conv_h2", "conv_w2", "conv_l"):
                    getattr(layer, name).weight.copy_(torch.from_numpy(p[name].transpose(3, 2, 0, 1).copy()))
                layer.conv_l.bias.copy_(torch.from_numpy(p["conv_l_bias"]))
                layer.bias.copy_(torch.from_numpy(p["fuse_bias"]))


def original_train_step(model, opt, bert, ids, mask, y, w, train, shape, device_type: str, autocast: bool):
    """One training step as the original takes it: the frozen BERT (dropout on, train mode) encodes the
    prompts, condition and target noise, weighted MSE, backward, global-norm clip, AdamW step (under bf16
    autocast when `autocast`). ids/mask [B*N, L]; y [B, T, R, K]; w broadcastable to y; shape (B, N, L)."""
    b, n, length = shape
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        with torch.no_grad():
            cond = bert(input_ids=ids, attention_mask=mask).last_hidden_state.reshape(b, n, length, -1)
        cond = cond + train.noise_condition * torch.randn_like(cond)
        target = y + train.noise_target * torch.randn_like(y)
        loss = (w * (model(cond).float() - target) ** 2).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm)
    opt.step()
    return loss
