"""The MONAI-peer stand-in that `bench_training.py` times beside our step has the peer's published sizes
(shared FACTS: generator 44 M parameters, 17.8 M of them in FC heads, discriminator 6.2 M), so the speed
ratio the benchmark prints is against a step of the peer's size, not against a straw man."""

from __future__ import annotations

import torch
from benchmarks.monai_peer import CODE, SIZE, PeerDiscriminator, PeerGenerator, parameter_counts, synthetic_batch


def test_parameter_counts_are_the_peers() -> None:
    counts = parameter_counts()
    assert abs(counts["generator"] - 44.0e6) < 0.1e6
    assert abs(counts["fc_heads"] - 17.8e6) < 0.05e6
    assert abs(counts["discriminator"] - 6.2e6) < 0.1e6


def test_shapes_of_one_forward() -> None:
    torch.manual_seed(0)
    g, d = PeerGenerator().eval(), PeerDiscriminator().eval()
    b = synthetic_batch(2)
    with torch.no_grad():
        code, image, mask = g(b["noise"], b["genes"], b["base"])
        logits = d(image, code, mask)
    assert code.shape == (2, CODE) and image.shape == mask.shape == (2, 1, SIZE, SIZE)
    assert [tuple(x.shape) for x in logits] == [(2,), (2,), (2,)]
