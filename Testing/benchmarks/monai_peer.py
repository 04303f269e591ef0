"""A stand-in for the MONAI RGGAN re-implementation (Project-MONAI PR 531, 2020), for timing side by side.

Built from the peer's published sizes, not its code: 128² patches; a generator of 44 M parameters, 17.8 M of
them in fully connected heads (the 5-head "synthesis" stage making 8×8 code maps, one of them allocated but
never used, as in the peer) after a gene encoder 5172 → 512 → 128 without bias; noise 10; a discriminator of
6.2 M (image, image+mask and image+mask+code encoders of 3×3 stride-2 convolutions, 8×8 logit kernels);
least-squares losses with weights D_ISG 10, D_I 8, D_IS 1 and background L1 100; Adam 1e-4 (0.5, 0.999).

The step is the peer's, as MONAI's `GanTrainer` ran it: a generator forward; a D step scoring real, wrong-code,
wrong-mask and fake tuples in four separate D calls; a second generator forward; a G step whose loss calls D
twice on the same fake (one result unused). Float32, no EMA. What matters for the comparison is the work per
step (layer shapes, passes), which this reproduces; `Testing/test_monai_peer.py` pins the parameter counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SIZE = 128          # the peer's patches
GENES = 5172
CODE = 128          # gene embedding
NOISE = 10
CODE_MAP = 8        # side of the FC heads' code maps
G_FEATURES = 32     # the peer's g_n_feat; its synthesis stage is 16× wider
D_FEATURES = 64     # the peer's d_n_feat
WEIGHTS = {"d_isg": 10.0, "d_i": 8.0, "d_is": 1.0, "background_l1": 100.0}


def _conv_bn(cin: int, cout: int, stride: int = 1, bias: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=bias), nn.BatchNorm2d(cout))


def _adain(content: Tensor, style: Tensor, eps: float = 1e-5) -> Tensor:
    """Content re-normalised to the style's per-channel mean and std (both over space)."""
    def stats(x: Tensor) -> tuple[Tensor, Tensor]:
        flat = x.flatten(2)
        return flat.mean(2)[..., None, None], (flat.var(2) + eps).sqrt()[..., None, None]

    c_mean, c_std = stats(content)
    s_mean, s_std = stats(style)
    return (content - c_mean) / c_std * s_std + s_mean


class FusionStage(nn.Module):
    """conv-BN-act, conv-BN to 2C; the last C make a switch that mixes background and AdaIN'd object."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.body = nn.Sequential(_conv_bn(channels, 2 * channels, bias=False), nn.LeakyReLU(0.02),
                                  _conv_bn(2 * channels, 2 * channels, bias=False))

    def forward(self, features: Tensor, background: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
        both = self.body(features)
        keep = (torch.tanh(both[:, self.channels:]) + 1) / 2
        return background * keep + _adain(both[:, : self.channels] * (1 - keep), code), keep


class PeerGenerator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        nf = 16 * G_FEATURES                       # 512 channels at the 8×8 bottleneck
        style = CODE + NOISE
        self.encoder = nn.Sequential(nn.Linear(GENES, 4 * CODE, bias=False), nn.LeakyReLU(0.2),
                                     nn.Linear(4 * CODE, CODE, bias=False))
        # FC heads → code maps of nf, nf/2, nf/4, nf/8 (and an unused nf/16) channels at 8×8, GLU-gated.
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(style, 2 * c * CODE_MAP**2, bias=False), nn.BatchNorm1d(2 * c * CODE_MAP**2),
                          nn.GLU(1))
            for c in (nf, nf // 2, nf // 4, nf // 8, nf // 16)
        )
        widths = [nf // 16, nf // 8, nf // 4, nf // 2, nf]         # background encoder: 128² → 8²
        self.background = nn.ModuleList(
            _conv_bn(cin, cout, stride=1 if i == 0 else 2) for i, (cin, cout) in enumerate(zip([1, *widths], widths))
        )
        self.fusion = nn.ModuleList(FusionStage(nf >> i) for i in range(4))
        self.upsample = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2), _conv_bn(nf >> i, nf >> i, bias=False), nn.GLU(1))
            for i in range(4)
        )
        self.to_image = nn.Sequential(nn.Conv2d(G_FEATURES, 2, 3, 1, 1, bias=False), nn.Tanh())
        self.image_head = nn.Sequential(nn.Linear(style, 2 * CODE_MAP**2, bias=False),
                                        nn.BatchNorm1d(2 * CODE_MAP**2), nn.GLU(1))

    def forward(self, noise: Tensor, genes: Tensor, base: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        code = self.encoder(genes)
        style = torch.cat([code, noise], 1)
        maps = [head(style).view(len(style), -1, CODE_MAP, CODE_MAP) for head in self.heads[:4]]
        backgrounds = []
        x = base
        for block in self.background:
            x = block(x)
            backgrounds.append(x)
        x, _ = self.fusion[0](backgrounds[4], maps[0], maps[0])
        x = self.upsample[0](x)
        for i in range(1, 4):
            x, _ = self.fusion[i](x, backgrounds[4 - i], maps[i])
            x = self.upsample[i](x)
        self.image_head(style)                      # computed and unused, as in the peer's image stage
        out = self.to_image(x)
        switch = (torch.tanh(out[:, 1:]) + 1) / 2
        return code, base * (1 - switch) + out[:, :1] * switch, out[:, 1:]


class PeerDiscriminator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        nf = D_FEATURES

        def encoder(inputs: int) -> nn.Sequential:
            layers: list[nn.Module] = [nn.Conv2d(inputs, nf, 3, 2, 1, bias=False), nn.LeakyReLU(0.2)]
            for cin in (nf, 2 * nf, 4 * nf):
                layers += [nn.Conv2d(cin, 2 * cin, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * cin), nn.LeakyReLU(0.2)]
            return nn.Sequential(*layers)

        self.image = encoder(1)
        self.pair = encoder(2)
        self.with_code = nn.Sequential(nn.Conv2d(8 * nf + CODE, 8 * nf, 3, 1, 1, bias=False),
                                       nn.BatchNorm2d(8 * nf), nn.LeakyReLU(0.2))
        self.logits = nn.ModuleList(nn.Conv2d(8 * nf, 1, CODE_MAP) for _ in range(3))

    def forward(self, image: Tensor, code: Tensor, mask: Tensor) -> list[Tensor]:
        pair = self.pair(torch.cat([image, mask], 1))
        grid = code[..., None, None].expand(-1, -1, *pair.shape[-2:])
        isg = self.with_code(torch.cat([grid, pair], 1))
        return [head(x).flatten() for head, x in zip(self.logits, (isg, self.image(image), pair))]


def parameter_counts() -> dict[str, int]:
    """Parameters of the stand-in: generator, its FC heads (incl. their batch norms), discriminator."""
    g, d = PeerGenerator(), PeerDiscriminator()
    heads = [*g.heads, g.image_head]
    return {
        "generator": sum(p.numel() for p in g.parameters()),
        "fc_heads": sum(p.numel() for h in heads for p in h.parameters()),
        "discriminator": sum(p.numel() for p in d.parameters()),
    }


def synthetic_batch(batch: int, seed: int = 0) -> dict[str, Tensor]:
    """The peer's inputs: image, mask in [-1, 1], wrong image and mask, a background, genes, noise."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 1, SIZE, SIZE, generator=g) * 2 - 1
    mask = (torch.rand(batch, 1, SIZE, SIZE, generator=g) > 0.9).float() * 2 - 1
    return {"image": image, "mask": mask, "wrong_image": image.roll(1, 0), "wrong_mask": mask.roll(1, 0),
            "base": torch.rand(batch, 1, SIZE, SIZE, generator=g) * 2 - 1,
            "genes": torch.randn(batch, GENES, generator=g), "noise": torch.randn(batch, NOISE, generator=g)}


class PeerStep:
    """One training iteration of the peer (see the module docstring), on a fixed batch."""

    def __init__(self, batch: int = 16, device: torch.device | str = "cpu", seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.g, self.d = PeerGenerator().to(device), PeerDiscriminator().to(device)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=1e-4, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=1e-4, betas=(0.5, 0.999))
        self.batch = {k: v.to(device) for k, v in synthetic_batch(batch, seed).items()}

    def _lsq(self, logits: Tensor, target: float) -> Tensor:
        return F.mse_loss(logits, torch.full_like(logits, target))

    def __call__(self) -> dict[str, float]:
        b, w = self.batch, WEIGHTS
        code, fake, fake_mask = self.g(b["noise"], b["genes"], b["base"])
        # D step: four D calls; per head, (target of real, wrong code, wrong mask, fake).
        self.opt_d.zero_grad(set_to_none=True)
        code_d = code.detach()
        scored = [self.d(image, code_d, mask) for image, mask in (
            (b["image"], b["mask"]), (b["wrong_image"], b["wrong_mask"]), (b["image"], b["wrong_mask"]),
            (fake.detach(), fake_mask.detach()))]
        targets = {"d_isg": (1, 0, 0, 0), "d_i": (1, 1, 1, 0), "d_is": (1, 1, 0, 0)}
        d_loss = sum(w[name] * self._lsq(logits[head], t)
                     for head, (name, ts) in enumerate(targets.items()) for logits, t in zip(scored, ts))
        d_loss.backward()
        self.opt_d.step()
        # G step: a second G forward; D called twice on the fake, the first result unused.
        code, fake, fake_mask = self.g(b["noise"], b["genes"], b["base"])
        self.opt_g.zero_grad(set_to_none=True)
        self.d(fake, code, fake_mask)
        isg, i, is_ = self.d(fake, code, fake_mask)
        keep = (fake_mask.detach() < 0).float()
        g_loss = (w["d_isg"] * self._lsq(isg, 1) + w["d_i"] * self._lsq(i, 1) + w["d_is"] * self._lsq(is_, 1)
                  + w["background_l1"] * F.l1_loss(fake * keep, b["base"] * keep))
        g_loss.backward()
        self.opt_g.step()
        return {"d_total": d_loss.detach().item(), "g_total": g_loss.detach().item()}
