"""VAAL: variational adversarial active learning (Sinha, Ebrahimi & Darrell, ICCV 2019).

A small VAE (conv encoder and decoder, latent ``mu``/``logvar``) and a discriminator on the
latent mean are trained adversarially on the pool's images: the discriminator learns to tell
labeled images (target 1) from unlabeled ones (target 0); the VAE learns to reconstruct both and
to make the discriminator call every image "labeled". After training, the unlabeled images the
discriminator scores least "labeled" are the ones least like the labeled set, and those are
picked. As in the paper, the task model plays no part in the selection.

As in the authors' code (github.com/sinhasam/vaal): latent dim 32, Adam at lr 5e-4 for both
nets, 2 VAE steps and 1 discriminator step per iteration, beta = 1, adversary weight 1, the
discriminator a 3-layer MLP (512 units) with a sigmoid, selection by the lowest ``D(mu)``.
Differences, for a 2-core CPU budget: a narrower conv net (``width`` 16 -> 128 channels over 4
stride-2 stages instead of 128 -> 1024: 0.086 GFLOP per image forward + backward at 64 px,
0.32 at width 32), images resized to ``size`` (64 px) and scaled to [0, 1] with a sigmoid
output, and an epoch defined as one pass over the unlabeled images (each iteration pairs a batch
of unlabeled with a batch of labeled images, the labeled ones cycling), 1 epoch by default
(about 100 iterations on the HAM10000 pool, an estimated ~40 s on 2 CPU cores: see
docs/benchmarks.md, "Pre-registered protocol"). The
VAE loss is the per-sample negative ELBO (squared error summed over pixels, KL summed over the
latent units, both averaged over the batch); the authors' code takes the pixel mean of the
squared error and the batch sum of the KL, which lets the adversarial and KL terms swamp the
reconstruction: on the toy pool of ``tests/ml/test_vaal.py`` (chance: 10 of 20 picks from the
missing mode) it left the discriminator at 0.50 to 0.52 for every image and picked 20 and 10 of
20 with seeds 0 and 1, where the per-sample ELBO scores the missing mode ~0.8 against ~0.46 and
picks 16 to 20 of 20 with seeds 0 to 4.

Deterministic for a given seed on a given device and thread count: the weights, the batches and
the VAE noise come from ``seed`` (the global torch RNG is forked, not disturbed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VaalConfig:
    """VAAL's settings (defaults: the authors' except ``width``, ``size``, ``epochs`` and the
    loss scale, see the module docstring)."""

    epochs: int = 1  # passes over the unlabeled images: ~100 iterations on HAM10000's pool
    size: int = 64  # images are resized to size x size (a multiple of 16)
    latent_dim: int = 32
    width: int = 16  # channels of the first conv; doubled at each of the 4 stages
    batch_size: int = 64
    lr: float = 5e-4
    beta: float = 1.0  # KL weight
    adversary_weight: float = 1.0
    vae_steps: int = 2
    disc_steps: int = 1


class VAE(nn.Module):
    """Conv encoder (4 stride-2 stages) to ``mu``, ``logvar``; mirrored decoder to [0, 1]."""

    def __init__(self, size: int = 64, latent_dim: int = 32, width: int = 32) -> None:
        super().__init__()
        if size % 16 or size < 16:
            raise ValueError(f"VAE size must be a multiple of 16, got {size}")
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        self.cells = size // 16
        enc: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            enc += [nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        flat = chans[-1] * self.cells**2
        self.mu = nn.Linear(flat, latent_dim)
        self.logvar = nn.Linear(flat, latent_dim)
        self.expand = nn.Linear(latent_dim, flat)
        dec: list[nn.Module] = []
        rev = chans[::-1]
        for cin, cout in zip(rev[:-2], rev[1:-1], strict=True):
            dec += [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout)]
            dec.append(nn.ReLU())
        self.decoder = nn.Sequential(*dec, nn.ConvTranspose2d(rev[-2], 3, 4, 2, 1), nn.Sigmoid())
        self.top = chans[-1]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.mu(h), self.logvar(h).clamp(-10.0, 10.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(reconstruction, mu, logvar)``."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        h = self.expand(z).view(-1, self.top, self.cells, self.cells)
        return self.decoder(h), mu, logvar


class Discriminator(nn.Module):
    """``P(labeled | mu)``: a 3-layer MLP with a sigmoid (the authors' design)."""

    def __init__(self, latent_dim: int = 32, hidden: int = 512) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(1)


def _batch(images: torch.Tensor, rows: np.ndarray, size: int, device: torch.device) -> torch.Tensor:
    """uint8 [n, H, W, 3] rows -> float [n, 3, size, size] in [0, 1] on ``device``."""
    x = images[torch.from_numpy(rows)].to(device).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        mode = "area" if x.shape[-1] > size else "bilinear"
        x = F.interpolate(x, size=(size, size), mode=mode)
    return x


def _vae_loss(vae: VAE, x: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample negative ELBO: squared error summed over pixels + beta * KL summed over the
    latent units, both averaged over the batch; mu)."""
    recon, mu, logvar = vae(x)
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(x)
    return F.mse_loss(recon, x, reduction="sum") / len(x) + beta * kl, mu


def check_images(images: np.ndarray, n: int) -> np.ndarray:
    """``images`` as uint8 [n, H, W, 3], or a clear ValueError."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[0] != n or arr.shape[3] != 3 or arr.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 [{n}, H, W, 3] matching labeled, got {arr.dtype} {arr.shape}"
        )
    return arr


def vaal_scores(
    images: np.ndarray,
    labeled: np.ndarray,
    *,
    seed: int = 0,
    device: str = "cpu",
    config: VaalConfig | None = None,
) -> np.ndarray:
    """Train VAAL on the pool and return float64 [N]: ``1 - D(mu(x))``, the discriminator's
    confidence that each image is unlabeled (higher: picked first).

    images: uint8 [N, H, W, 3], the whole pool; labeled: bool [N] (at least one labeled and one
    unlabeled image, else ValueError)."""
    c = config or VaalConfig()
    lab = np.asarray(labeled, dtype=bool)
    pool = torch.from_numpy(np.ascontiguousarray(check_images(images, len(lab))))
    lab_rows, unl_rows = np.flatnonzero(lab), np.flatnonzero(~lab)
    if len(lab_rows) == 0 or len(unl_rows) == 0:
        raise ValueError("vaal needs at least one labeled and one unlabeled image")
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(auto if device == "auto" else device)
    rng = np.random.default_rng([seed, 7])
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        vae = VAE(c.size, c.latent_dim, c.width).to(dev)
        disc = Discriminator(c.latent_dim).to(dev)
        opt_vae = torch.optim.Adam(vae.parameters(), lr=c.lr)
        opt_disc = torch.optim.Adam(disc.parameters(), lr=c.lr)
        steps = c.epochs * math.ceil(len(unl_rows) / c.batch_size)
        unl_order, lab_order = np.empty(0, np.int64), np.empty(0, np.int64)
        vae.train()
        disc.train()
        for _ in range(steps):
            if len(unl_order) < c.batch_size:
                unl_order = np.concatenate([unl_order, rng.permutation(unl_rows)])
            while len(lab_order) < c.batch_size:
                lab_order = np.concatenate([lab_order, rng.permutation(lab_rows)])
            take_u = min(c.batch_size, len(unl_rows))
            xu = _batch(pool, unl_order[:take_u], c.size, dev)
            xl = _batch(pool, lab_order[: c.batch_size], c.size, dev)
            unl_order, lab_order = unl_order[take_u:], lab_order[c.batch_size :]
            for _ in range(c.vae_steps):
                loss_l, mu_l = _vae_loss(vae, xl, c.beta)
                loss_u, mu_u = _vae_loss(vae, xu, c.beta)
                pred = disc(torch.cat([mu_l, mu_u]))  # the VAE wants every image "labeled"
                fool = F.binary_cross_entropy(pred, torch.ones_like(pred))
                opt_vae.zero_grad(set_to_none=True)
                (loss_l + loss_u + c.adversary_weight * fool).backward()
                opt_vae.step()
            for _ in range(c.disc_steps):
                with torch.no_grad():
                    mu = torch.cat([vae.encode(xl)[0], vae.encode(xu)[0]])
                target = torch.cat([torch.ones(len(xl)), torch.zeros(len(xu))]).to(dev)
                loss_d = F.binary_cross_entropy(disc(mu), target)
                opt_disc.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_disc.step()
        vae.eval()
        disc.eval()
        out = np.empty(len(lab), dtype=np.float64)
        with torch.no_grad():
            for start in range(0, len(lab), 4 * c.batch_size):
                rows = np.arange(start, min(start + 4 * c.batch_size, len(lab)))
                p = disc(vae.encode(_batch(pool, rows, c.size, dev))[0])
                out[rows] = 1.0 - p.double().cpu().numpy()
    return out


def vaal_select(
    images: np.ndarray,
    labeled: np.ndarray,
    budget: int,
    *,
    seed: int = 0,
    epochs: int = VaalConfig.epochs,
    device: str = "cpu",
    config: VaalConfig | None = None,
) -> np.ndarray:
    """The ``min(budget, #unlabeled)`` unlabeled pool indices (int64, best first) that VAAL's
    discriminator scores least "labeled"; ties to the lowest index. ``config`` overrides
    ``epochs`` when given."""
    lab = np.asarray(labeled, dtype=bool)
    unl = np.flatnonzero(~lab)
    if budget <= 0 or len(unl) == 0:
        return np.empty(0, dtype=np.int64)
    score = vaal_scores(images, lab, seed=seed, device=device,
                        config=config or VaalConfig(epochs=epochs))  # fmt: skip
    return unl[np.argsort(-score[unl], kind="stable")[:budget]].astype(np.int64)
