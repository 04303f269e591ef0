"""Every loss term of the paper in one place (stylegan2-ada's `loss.py` style).

Least-squares GAN (Mao et al. 2017) with the paper's equations and targets (DESIGN.md decision 4)::

    L_DI   = (D_I(x) − 1)² + D_I(Gx)²
    L_DIS  = (D_IS(x, m) − 1)² + D_IS(x, m̄)² + D_IS(Gx, Gm)²
    L_DISG = (D_ISG(x, m, g) − 1)² + D_ISG(x, m̄, g)² + D_ISG(x, m, ḡ)² + D_ISG(Gx, Gm, g)²
    L_D    = w_I·L_DI + w_IS·L_DIS + w_ISG·L_DISG  (+ γ/2·E‖∇ₓ Σ_heads D(x, …)‖², R1, beyond the paper)
    L_G    = w_I·(D_I(Gx) − 1)² + w_IS·(D_IS(Gx, Gm) − 1)² + w_ISG·(D_ISG(Gx, Gm, g) − 1)²
             + λ·mean(M ⊙ |Gx − b|),   M = erode₅ₓ₅(1 − [Gm > 0.5])  (no gradient through M)
             + c_A·|area(Gm) − area(m)| + c_I·|mean(Gx | Gm) − mean(x | m)|   (beyond the paper)
             + c_M·‖edge(Gx, Gm) − edge(x, m)‖₁ + c_S·|compact(Gm) − compact(m)|  (beyond the paper)
             + c_C·‖centroid(Gm ⊙ [Gm > 0.5]) − centroid(m)‖₂ / S                  (beyond the paper)
             + c_L·|log(area(Gm) + f) − log(area(m) + f)| + c_D·(the same of σ((Gm − ½)/T))  (beyond the paper)
             + c_K·|core(Gx, Gm) − core(x, m)|                                     (beyond the paper)
             + c_Q·mean_q |Q_q(Gx | [Gm > ½]) − Q_q(x | m)|,  q ∈ QUANTILES              (beyond the paper)
             + c_B·β²,  β = slope of bandpass(Gx) on bandpass(b) inside erode([Gm > ½])   (beyond the paper)
             + c_P·mean((φ(g)[:F] − s·z(donor))²)                                 (beyond the paper)
             + c_MS·mean(relu(1 − d(Gx, Gx′)·E|z−z′| / (|z − z′|·τ)))              (beyond the paper)

The consistency terms tie the generated nodule to the donor's real one: the (soft) mask area as a fraction
of the patch, and the mean intensity inside the (soft) mask, each against the paired real slice (x, m) whose
genes g the generator was given. Why: on held-out patients the adversarial terms alone learned no gene
control (D_ISG can ignore φ(g)); measured once, these terms took size ρ on test donors from ≈ 0 to 0.79.
The margin and shape terms do the same for the edge: `edge_profile` (the mean image just inside and just
outside the mask's edge, each above the surrounding lung: what the evaluation's margin sharpness is made
of) and `soft_compactness` (4π·area/perimeter², the perimeter as the mask's total
variation, so spiculated and lobulated outlines score low). Why they were tried: with area and intensity
alone and the earlier gene front-end the margin never followed the genes (margin ρ 0.18 on held-out donors,
whatever the seed); with the current front-end it follows better without them (`LossWeights`), so they are
off by default. Setting the area and intensity weights to 0 as well gives the paper's loss exactly.

The position term asks the drawn nodule to sit where the paired real slice's nodule sits in its patch
(about the centre: patches are centred on the nodule), in patch widths S. Why: without it the trained model
laid its smaller nodules over tissue the background already had — chest wall, mediastinum, vessels 8–19 mm
from the centre — so the size and density terms were met without drawing anything in the lung, and the
insertion's lung clip then left no nodule at the clicked point (the evaluation's "where the nodule is drawn",
three seeds on the unseen cohort: median centroid 9.6 ± 3.5 mm from the centre, 33 ± 9 % of drawn nodules
mostly on existing tissue, against 8 % for discs at the centre; 25 % of inserted nodules without a label).
Only pixels above 0.5 weigh, so faint mask mass elsewhere cannot move the centroid.

The core term asks the drawn nodule's inside to be shaped like the real one's: `core_contrast` is the mean
intensity of the mask's inner half (within R/2 of its centroid, R the drawn equivalent radius) minus that of
its outer half — a part-solid or solid-cored ground-glass nodule is brighter in the middle. Why: the real
nodule slices of the unseen cohort have a core contrast of 0.17 (median, [0.08, 0.34] interquartile; ≈ 130
HU); one round-8 model (seed 11, 600 slices, one diagnostic draw) drew 0.06 ([−0.02, 0.18]) with a per-slice
Spearman 0.16 against the paired real slice: flat nodules whose inside did not follow the genes, which the
intensity term (a mean) cannot see. Over three seeds the evaluation's measure agrees (README round 9).
Nodules smaller than `CORE_MIN_PX` drawn pixels, on either side, add 0.

The quantile term asks the intensities inside the drawn nodule to be distributed like the real one's: the
mean absolute difference of their deciles (a 1-D Wasserstein distance), so a solid nodule must reach solid
density and stay even, and a ground-glass one stay faint. Why: with the intensity (a soft-mask mean) and core
terms on, the round-9 bundled model's drawn nodules were 80–110 HU too faint on average and their brightest
tenth 140–190 HU too faint (median over the 64 donors of the unseen cohort at the centre slice, largest real
slice against six draws), and the C2ST critics' surest "synthetic" calls were large grey, mottled nodules
where the real ones are bright and even. Rows with fewer than `CORE_MIN_PX` drawn pixels on either side add 0.

The spicule term asks the drawn outline to carry as many thin strands as the real one: `thin_strand_area` is
what a grey opening with the 3×3 cross removes from the mask (parts at most about 2 px wide), the differentiable
twin of the evaluation's `spicule_area_mm2`, whose ρ with the true spiculation is 0.73 on real nodules. Why: no
model drew spicules — generated nodules 0–2 mm² of strands against a median 5.0 mm² for the spiculated real
ones, `spiculation_rho` 0.15 ± 0.13 (README round 15). The opening keeps a blurred edge whole (a ramp is no
strand), so the term does not fight the code-driven edge blur; measured on the drawn mask (`drawn_mask`), its
gradient acts where the mask crosses 0.5, the outline. Alone on a free mask it can be met by a serrated outline
as well as by long strands (a test shows both directions); the D_IS critic, which sees real masks, is what
asks for strands that look like the real ones.

The leak term asks that the background's structures not show through the drawn nodule: β is the slope of
the generated image's band-pass (Gaussian σ 1 px minus σ 4 px: vessels, airway walls) regressed on the
background's, over the drawn mask's inside (eroded `LEAK_ERODE_PX`), so β = 1 for a copied background, 0 where
the nodule replaces it — as a real nodule does, which displaces the lung it grows in. Why: inside the round-10
models' drawn nodules (unseen cohort, lung-only backgrounds; the evaluation's `interior_leak`) that slope is
0.49 ± 0.19 in the median over three seeds (the bundled model 0.62): vessels and airway walls show through at
half their contrast, which is the mottled look the C2ST critics flagged and the airway ring inside a
ground-glass nodule in the demo. The band-passes are normalised convolutions over the inside only, so the
lung around the nodule does not enter; rows with fewer than `CORE_MIN_PX` inside pixels, or a background
without structure there, add 0; the geometry carries no gradient.

The code-phenotype term anchors the first F coordinates of the gene code φ(g) to the donor's real nodule,
measured (diameter, mean HU, margin sharpness by default) and z-scored over the training donors
(`dataset.donor_phenotypes`, the batch's `phenotype`). Why: φ(g) is the radiogenomic map, yet nothing asked
it to be organised by what the genes do to the image; its k-means clusters matched the gene modules worse
than the prepared genes it was computed from (ARI 0.59 against 0.87 on an unseen cohort). Anchored, the
mapping must predict each donor's phenotype from the genes — a regression a linear model does well on
held-out patients — and G receives that prediction as named coordinates of its style.

The mode-seeking term (Mao et al. 2019, MSGAN; capped as in DSGAN, Yang et al. 2019) asks that two noises
z, z′ for the same background and genes give different nodules: d is the mean L1 ([0, 1] units) inside the
dilated union of the two masks — the evaluation's noise diversity — per unit of noise distance, and the hinge
stops pushing once it reaches the target τ, so noise is not asked to vary the nodule beyond what a real
nodule varies (which would take control from the genes). Why: noise changed the nodule less than a real
nodule changes between neighbouring slices (0.024 against 0.043 on the unseen cohort), and issue 10 asks for
noise that changes the nodule. G draws the second image for half of the batch with another row's noise
(`train_iteration`), so it needs no extra random numbers and resume stays bit-exact; with
``mode_seeking_every`` = K only on every K-th step, at K times the weight (lazy, as StyleGAN2's R1).

Every E[·] is a mean over the batch; the terms are summed as written in the paper (no ½ factors, no
averaging of the negatives). The same head weights scale a head's terms in the D and the G loss, so a head
that G is asked to satisfy more is also trained more. The L1 is a mean over *all* pixels of the masked
difference — the paper's E[‖Gx⊙M − b⊙M‖₁] per pixel — so λ means what it means in pix2pix/CT-GAN.

Conditioning code of D_ISG: the generator's φ(g), detached in the D step (DESIGN.md decision 5); ḡ's code
is φ(ḡ) from the generator's mapping under no_grad. With ``independent_mapping`` D maps raw g and ḡ itself
(its mapping learns in the D step, is frozen in the G step like the rest of D).

Baselines: MC-GAN-style uses exactly the same losses (it has φ(g) too). The inpainting baseline has no
genes, so no D_ISG: its generator gets the real nodule slice x with a disc of `hole_scale` × the nodule's
equivalent radius erased (`hole_from_mask`), and its loss is ``hole_l1 · mean(H ⊙ |Gx − x|)`` (H the
hole, same per-pixel normalisation as the background L1) + the D_I and D_IS adversarial terms. This is the
fair Table-1 comparison of decision 9: same slices, same 2D patches, and the evaluation region of the
inpainting method is the same 1.5 × radius disc.

Efficiency and batch norm: every encoder runs once on a batch that stacks all the tuples it must score
(image encoder: [x; Gx]; image+mask encoder: [(x, m); (x, m̄); (Gx, Gm)]); the (x, m) features are reused
for the mismatched-gene term. The G step scores the *same* stacked batch and keeps the fake rows, so D's
batch norm sees identical batch statistics in both steps. Scoring the fake tuple alone in the G step (as the
authors' code did) lets G fool D through the batch statistics: on the phantom, D_IS then rated garbage
masks as real in the G step while rejecting them in the D step, and the masks never became nodules.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from RadiogenomicGANLib.networks import KINDS, GeneratorOutput, hole_from_mask
from RadiogenomicGANLib.strict_dict import StrictDict, check_value

from .discriminator import Discriminator, square_dilation
from .metrics import CORE_MIN_PX


class SecondDraw(NamedTuple):
    """G's output for the first rows of a batch again, with other noise: what the mode-seeking term compares."""

    output: GeneratorOutput   # rows [:n] of the batch, noise `other_noise`
    noise: Tensor             # (n, noise_dim) the noise of those rows in the main draw
    other_noise: Tensor       # (n, noise_dim)

MASK_THRESHOLD = 0.5  # decision 6: the L1 region is built from [Gm > 0.5]
# the real-nodule features the code-phenotype term anchors φ(g)[:3] to: what gene control measures
CODE_PHENOTYPE_FEATURES: tuple[str, ...] = ("diameter_mm", "mean_hu", "margin_sharpness")
# the fourth anchored feature when the generator draws strands (`GeneratorConfig.spicules`): the coordinate they read
SPICULE_PHENOTYPE_FEATURE = "spicule_area_mm2"
# the next one when the generator draws lobes (`GeneratorConfig.lobes`): the coordinate their height reads
LOBE_PHENOTYPE_FEATURE = "lobe_amplitude"


def code_phenotype_features(spicules: int | bool = False, lobes: bool = False) -> tuple[str, ...]:
    """The real-nodule features φ(g)[:F] is anchored to: size, density, margin, with drawn spicules their area,
    with drawn lobes the outline's lobe amplitude."""
    return (*CODE_PHENOTYPE_FEATURES, *((SPICULE_PHENOTYPE_FEATURE,) if spicules else ()),
            *((LOBE_PHENOTYPE_FEATURE,) if lobes else ()))


@dataclass
class LossWeights(StrictDict):
    """Weights of every loss term. Defaults and why:

    * ``d_i = d_is = d_isg = 1``: the paper's equations are unweighted sums; the MONAI peer's 8/1/10 has
      no stated reason and makes G chase D_ISG and D_I while D_IS (the mask's realism) barely counts.
      `monai_peer()` gives that setting for comparison.
    * ``background_l1 = 15`` (λ, MC-GAN's value): measured on the phantom (64 patients, 2000 steps, demo
      architecture), λ = 100 — pix2pix's, CT-GAN's and the MONAI peer's — never lets a nodule appear: an
      unmasked nodule costs far more L1 than the adversarial terms can pay, so G keeps the mask empty and
      copies the background (0 % nodules in the sample grids). With λ = 15 nodules appear within 500 steps
      and the background still stays close (whole-patch SSIM 0.94, PSNR 28 dB against the input).
    * ``hole_l1 = 100``: the inpainting baseline's reconstruction weight, CT-GAN's ×100, same
      normalisation as λ.
    * ``erosion_kernel = 5``: the authors' 5×5 erosion, so the blending rim next to the nodule is left to
      the adversarial terms rather than pinned to the background.
    * ``hole_scale = 1.5``: disc radius as a multiple of the nodule's equivalent radius (decision 9).
    * ``consistency_area = 10``, ``consistency_intensity = 2``: the consistency terms (module docstring); an
      area error of 5 % of the patch or an intensity error of 0.25 (≈ 190 HU) then costs about as much as
      one adversarial term. Used by the gene-conditioned kinds only. The recommended setting raises the
      intensity weight to 4: with the anchor at sd 3 (`GeneratorConfig.anchor_sd`) density then followed the
      genes for every seed (ρ 0.81–0.87 on the unseen cohort, against 0.55–0.84 at 2; README round 6).
    * ``consistency_margin = 0``, ``consistency_shape = 0``: the edge terms are off. Measured at weight 1
      each (three training seeds, protocol v2, README "Evaluation on the phantom") they did not help: on the
      validation donors margin ρ 0.25 with them against 0.59 without, ARI 0.46 against 0.82, and no gain on
      the unseen cohort. Per donor, the real slices' sharpness does follow the true margin blur (Spearman
      −0.71) and their compactness the spiculation (−0.65), so the terms measure the right thing.
    * ``code_phenotype = 0`` in the bare defaults; the recommended setting (README, `make demo-weights`) is 1,
      with the generator's code-driven edge (`GeneratorConfig.edge_blur_per_sd`), which reads the anchored
      margin coordinate and is refused without it, and the anchored coordinates at sd 3
      (`GeneratorConfig.anchor_sd`: k-means ARI of φ(g) on the unseen cohort 0.64 → 0.76 over three seeds).
      Alone (weight 1, three seeds, README "Evaluation on the phantom") the anchor did not help: its coordinates
      predict held-out donors' phenotypes (Spearman with the truth on the unseen cohort: diameter 0.94, solid
      fraction 0.81–0.85, margin blur −0.60 to −0.63), but the generator barely read them (±2 sd of the margin
      coordinate moved the generated sharpness by < 0.01) and gene control fell (margin ρ 0.25 against 0.33). With
      the edge inside the mask margin ρ rose to 0.63 ± 0.05.
    * ``consistency_position = 0`` in the bare defaults; the recommended setting is 10 (module docstring: a
      5-pixel offset then costs about as much as one adversarial term). Three seeds (README round 7): the
      drawn nodules' centroids 1.4 mm from the centre against 9.6, 8 % of them mostly on existing tissue
      against 33 % (centred discs 8 %), and no nodule lost at insertion against 25 %; gene control about level
      on cohort 5, margin lower on the unseen cohort (0.56 against 0.66).
    * ``consistency_spread = 0``: the spread term (`spread_term`), off; a drawn nodule reaching 5 pixels further
      from the point than the real one (in radius of gyration) costs its weight × 0.08, what the position term
      charges a 5-pixel offset. At 10 on top of the recommended setting (six training seeds, README round 30)
      the share of nodules drawn off the point on the unseen cohort 5 fell from 0.17 ± 0.19 to 0.04 ± 0.05 and
      the re-read validation rose from 0.59 ± 0.14 to 0.67 ± 0.02, but margin ρ fell (0.66 against 0.69) just
      under its floor (0.659), so it is not in the recommended setting yet (on cohort 7, read after that
      decision, margin rose instead: 0.57 against 0.52). A second, stricter test on the fresh cohort 9 (round
      31) missed its off-the-point limit: 0.056 ± 0.063 against 0.05 (0.146 ± 0.158 without the term).
    * ``consistency_log_area = 0``: the area's relative error (`log_area_term`), off; tried against small
      donors drawn too small or not at all (README round 7).
    * ``consistency_drawn_area = 0`` in the bare defaults; the recommended setting is 1: the same relative
      error for the *drawn* area (`drawn_mask`). Why: the log-area term can be met by faint mask probability
      that nothing downstream keeps (one seed of three lost 22 % of its nodules at insertion with it); the drawn
      area is what the labels are made of. Three seeds (README round 8): empty masks on the unseen cohort 0.024
      → 0.003, the smallest quarter of donors drawn at 0.64 of their real diameter against 0.52, none lost at
      insertion; with the slice position it is part of the recommended setting.
    * ``consistency_core = 0`` in the bare defaults; the recommended setting is 4 (an error of 0.1, 75 HU, then
      costs 0.4, about what the intensity term charges for the same error at its weight). Three seeds (README
      round 9): the generated core contrast on the unseen cohort 67–133 HU → 167–193 HU against the real 192,
      its Spearman with the donor's real nodule 0.13–0.40 → 0.37–0.50; gene control on cohort 5 level, the
      validation donors' ARI 0.71 → 0.65 and margin on the unseen cohort 0.62 → 0.54; realism unchanged.
    * ``consistency_quantiles = 0``: the quantile term (module docstring), off; an error of 0.1 (75 HU) at every
      decile costs its weight × 0.1. At 4 on top of the recommended setting (three seeds, README round 10) the
      drawn nodules' brightest tenth stayed 100–220 HU too faint on the unseen cohort, the validation score of
      the exported checkpoints fell (0.55 against 0.65 on average), and the insertion check's 90th-percentile
      offset rose (2.8–5.4 mm against 2.0–2.4); realism level within the spread.
    * ``consistency_spicules = 0``: the spicule term (`spicule_term`), off; an error of `SPICULE_SCALE_PX` thin-strand
      pixels (the real nodule slices' mean) costs its weight. Why it was tried: no configuration drew spicules
      (the evaluation's `spiculation_rho` 0.15 ± 0.13 on the unseen cohort, its ceiling 0.73; README round 15).
      On top of the recommended setting (README round 16): at 1 the nodules left the point and the slice
      profile (validation 0.40 / 0.06, two seeds); at 0.25 validation 0.666 ± 0.090 (three seeds; round 14
      recorded 0.673 for the default) and the thin-strand ρ on an unseen cohort 0.35 ± 0.28 against the
      default's −0.13 (two seeds), but by a rougher outline: long strands followed no seed's genes and were
      drawn less often (0.4–2.5 % of nodules against 2.3–7.3 %).
    * ``background_leak = 0``: the leak term (module docstring), off; a background showing through at half its
      contrast (β = 0.5) costs its weight × 0.25. On top of the recommended setting (three seeds, README round
      11) it broke the placement from the first checkpoints on: at 4 the validation donors' nodules were drawn
      off the point (misplaced 0.23–0.99 at step 1000, against 0.01–0.26 without; validation score −0.66 to
      0.06), at 16 nearly nothing was drawn in the lung; the runs were stopped. `GeneratorConfig.opaque_nodule`
      removes the leak's path instead.
    * ``mode_seeking = 0``, ``mode_seeking_target = 0.045`` in the bare defaults; the recommended setting is 1
      at τ = 0.025: the mode-seeking term (module docstring). At τ = 0.045, about the real nodules'
      slice-to-slice variation on the unseen cohort (0.043 in the evaluation's noise-diversity units), noise
      diversity rose from 0.024 to 0.068, past the real 0.043, while the map's clusters became seed-dependent
      and realism fell a little (three seeds, README round 7). At τ = 0.025 (three seeds, README rounds 13 and
      14) it reached 0.037 on every cohort with gene control about level, and the validation score rose on
      every seed against the same configuration without it (0.673 against 0.634 on average).
    * ``mode_seeking_every = 1``: the term's interval in steps. Its second draw costs about a third of a
      128² step (README, Benchmarks); at K > 1 it is computed on every K-th step only, at K times the weight,
      as StyleGAN2's lazy regularisation (Karras et al. 2020). At K = 2 (three seeds, README round 14) a step
      cost 1.31× the bare default instead of 1.50×, but the validation score fell to 0.576 on average, below
      both every step's and none's.
    * ``mode_seeking_detached = False``: how the second draw is made. False: in the same forward as the batch,
      so the term's gradient reaches both draws (a forward and backward of half the rows more: 1.42× the bare
      default's 128² step). True: in a forward without a graph, normalised with the batch's own batch-norm
      statistics (`training.batch_statistics`), so only the main draw is pushed, exactly as it is in the
      stacked form at the same weight (1.16× the bare step). On top of the recommended setting (README round
      15): at weight 2 the nodules left the point (a tenth to two fifths of the validation donors' drawn more
      than 5 mm off) and the validation score fell to 0.49 / 0.33 (seeds 11 / 7); at weight 1 it reached 0.693 /
      0.517 / 0.672 (mean 0.627), below the 0.634 of no mode seeking at all and the stacked form's 0.673.
    * ``mode_seeking_paired = False``: True makes the second draw part of the batch itself: its second half is its
      first half again (every input, the reals the losses compare with included), each row with its own noise,
      per-pixel noise map and augmentation (`training.iteration.paired_batch`). G then runs on the batch's rows
      only, as without the term (1.07× the bare default's 128² step, against 1.58× for the stacked form in the
      same session), and the term's gradient reaches both draws as in the stacked form, but a step sees half as
      many distinct samples. On top of the recommended setting (three seeds, README round 20) gene control,
      noise diversity and realism on the unseen cohort held (size / density / margin / ARI 0.92 / 0.80 / 0.73 /
      0.94), but the validation score fell to 0.598 ± 0.026 (re-read) against the stacked form's 0.659 ± 0.005,
      every seed still rising at step 2000: per step it learns less. Given the stacked form's wall time (2900
      steps) it was about level (re-read 0.649 ± 0.043, noise diversity 0.036 against 0.041), and level again on a
      new cohort (round 21), but `make demo-weights` at 2900 steps took 36.7 minutes, over issue 10's 30. Off.
    * ``d_augment = 0`` in the bare defaults; the recommended setting is 0.5: the probability (≤ 1) that each
      tuple the discriminator scores is augmented (`augment_alike`: DiffAugment's translation and cutout, Zhao
      et al. 2020). Why it was tried: D_I told real from generated patches from the first hundred steps on,
      also when it saw the nodule alone (`DiscriminatorConfig.image_view_px`): with about 900 real slices it
      can learn them by heart. At 0.5 on
      top of the recommended setting (three seeds, README round 10) D_I's margin shrank (0.86 against 0.14
      instead of 0.97 against 0.03) but realism did not move (lung-only C2ST 0.74 ± 0.01 on the unseen
      cohort, as without it) and noise diversity fell a little (0.020 against 0.023); it was kept because the
      validation score, the selection's tie-break, preferred it narrowly (0.669 against 0.648), with no empty
      mask on the validation donors (0.016 without).
    * ``r1 = 0``: no R1 penalty. At γ = 1 (three seeds) it made the patches more realistic (lung-only C2ST
      0.77 against 0.81 on the unseen cohort, 0.67 against 0.75 on the validation donors) but cost gene
      control (margin ρ 0.23 against 0.33; on the validation donors 0.31 against 0.59, ARI 0.57 against
      0.82), which is what checkpoints and configurations are chosen by. On top of the anchored, code-driven
      edge it made one seed of three lose the margin (validation margin ρ 0.35 ± 0.75 against 0.75 ± 0.04).
    """

    d_i: float = 1.0
    d_is: float = 1.0
    d_isg: float = 1.0
    background_l1: float = 15.0
    hole_l1: float = 100.0
    erosion_kernel: int = 5
    hole_scale: float = 1.5
    consistency_area: float = 10.0
    consistency_intensity: float = 2.0
    consistency_margin: float = 0.0
    consistency_shape: float = 0.0
    consistency_position: float = 0.0
    consistency_spread: float = 0.0
    consistency_log_area: float = 0.0
    consistency_drawn_area: float = 0.0
    consistency_core: float = 0.0
    consistency_quantiles: float = 0.0
    consistency_spicules: float = 0.0
    background_leak: float = 0.0
    code_phenotype: float = 0.0
    mode_seeking: float = 0.0
    mode_seeking_target: float = 0.045
    mode_seeking_every: int = 1
    mode_seeking_detached: bool = False
    mode_seeking_paired: bool = False
    r1: float = 0.0
    d_augment: float = 0.0

    def __post_init__(self) -> None:
        for name in ("erosion_kernel", "mode_seeking_every"):   # a config of floats may hold 3.0
            setattr(self, name, check_value(name, getattr(self, name), 0, what="LossWeights field"))
        for name in ("mode_seeking_detached", "mode_seeking_paired"):
            check_value(name, getattr(self, name), False, what="LossWeights field")
        if self.mode_seeking_detached and self.mode_seeking_paired:
            raise ValueError("mode_seeking_detached and mode_seeking_paired are two ways of making the second draw; "
                             "turn on one of them")
        for f in fields(self):
            if float(getattr(self, f.name)) < 0:
                raise ValueError(f"LossWeights.{f.name} must be >= 0, got {getattr(self, f.name)}")
        if self.d_augment > 1:
            raise ValueError(f"LossWeights.d_augment is a probability, at most 1, got {self.d_augment}")
        if self.erosion_kernel < 1 or self.erosion_kernel % 2 == 0:
            raise ValueError(f"erosion_kernel must be a positive odd number, got {self.erosion_kernel}")
        if self.hole_scale <= 0:
            raise ValueError(f"hole_scale must be > 0, got {self.hole_scale}")
        if self.mode_seeking and self.mode_seeking_target <= 0:
            raise ValueError(f"mode_seeking_target must be > 0, got {self.mode_seeking_target}")
        if self.mode_seeking_every < 1:
            raise ValueError(f"mode_seeking_every is a number of steps, at least 1, got {self.mode_seeking_every}")

    @classmethod
    def monai_peer(cls) -> LossWeights:
        """The MONAI RGGAN peer's weights (D_ISG 10, D_I 8, D_IS 1, L1 100), for ablation."""
        return cls(d_i=8.0, d_is=1.0, d_isg=10.0, background_l1=100.0)



# -- pure functions (tested by hand) ------------------------------------------------------------------


def ls_term(scores: Tensor, target: float) -> Tensor:
    """Least-squares GAN term E[(D − target)²] over the batch."""
    return (scores - target).square().mean()


def _masked_mean(image: Tensor, weight: Tensor) -> Tensor:
    """(B,) mean of `image` weighted by `weight` (B,1,H,W); ≈ 0 for an all-zero weight."""
    return (image * weight).sum(dim=(1, 2, 3)) / (weight.sum(dim=(1, 2, 3)) + 1e-3)


def eroded_background_mask(mask_prob: Tensor, kernel_size: int = 5) -> Tensor:
    """erode_k×k(1 − [mask_prob > 0.5]) as a float {0,1} tensor, shape of `mask_prob` (B,1,H,W).

    Binary erosion of the background = binary dilation (max-pool) of the foreground, so a pixel is kept
    only if no foreground pixel lies within its k×k neighbourhood. Outside the image counts as
    *background*: the patch border is not an object edge, so an empty mask gives all ones and the border
    is eroded only where the foreground comes within k//2 pixels of it. Computed without gradient: it is
    a weighting, and thresholding has no useful gradient anyway.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    with torch.no_grad():
        foreground = (mask_prob.detach() > MASK_THRESHOLD).to(mask_prob.dtype)
        if kernel_size > 1:
            # the max-pool pads with -inf, i.e. never foreground: the border-as-background rule above.
            foreground = square_dilation(foreground, kernel_size // 2)
        return 1.0 - foreground


def masked_l1(image: Tensor, reference: Tensor, weight: Tensor) -> Tensor:
    """mean over all pixels of weight ⊙ |image − reference| (the weight carries no gradient)."""
    return (weight.detach() * (image - reference).abs()).mean()


def _patch_axis(weight: Tensor) -> Tensor:
    """(S,) pixel coordinates in patch widths from the patch centre, for a (B, 1, S, S) weight."""
    size = weight.shape[-1]
    return (torch.arange(size, device=weight.device, dtype=weight.dtype) - (size - 1) / 2) / size


def _centroid(weight: Tensor) -> Tensor:
    """(B, 2) weighted centroid (row, column) in patch widths, from the patch centre."""
    axis = _patch_axis(weight)
    total = weight.sum(dim=(1, 2, 3)).clamp_min(1e-6)
    rows = (weight.sum(dim=3)[:, 0] * axis).sum(dim=1) / total
    cols = (weight.sum(dim=2)[:, 0] * axis).sum(dim=1) / total
    return torch.stack([rows, cols], dim=1)


def _drawn_where_real(mask: Tensor, real_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(mask ⊙ [mask > 0.5] with the gate detached, (B,) 1 for rows with something above 0.5 and a real nodule):
    the placement terms weigh only what the labels are made of, and leave empty rows to the area terms."""
    drawn = mask * (mask.detach() > MASK_THRESHOLD).to(mask.dtype)
    present = ((drawn.detach().sum(dim=(1, 2, 3)) > 0) & (real_mask.sum(dim=(1, 2, 3)) > 0)).to(mask.dtype)
    return drawn, present


def position_term(mask: Tensor, real_mask: Tensor) -> Tensor:
    """mean over rows with a drawn nodule of ‖centroid(Gm ⊙ [Gm > 0.5]) − centroid(m)‖₂ in patch widths; rows
    with nothing above 0.5 (or no real nodule) add 0 — the area term deals with empty masks."""
    drawn, present = _drawn_where_real(mask, real_mask)
    distance = (_centroid(drawn) - _centroid(real_mask.to(mask.dtype))).square().sum(dim=1).add(1e-12).sqrt()
    return (distance * present).sum() / mask.shape[0]


def _radius_of_gyration(weight: Tensor, centre: Tensor) -> Tensor:
    """(B,) √(Σ w·‖p − centre‖² / Σ w) in patch widths, centre (B, 2) as `_centroid` gives it."""
    axis = _patch_axis(weight)
    rows = (axis[None, :] - centre[:, :1]).square()              # (B, H)
    cols = (axis[None, :] - centre[:, 1:]).square()              # (B, W)
    total = weight.sum(dim=(1, 2, 3)).clamp_min(1e-6)
    second = (weight.sum(dim=3)[:, 0] * rows).sum(dim=1) + (weight.sum(dim=2)[:, 0] * cols).sum(dim=1)
    return (second / total).add(1e-12).sqrt()


def spread_term(mask: Tensor, real_mask: Tensor) -> Tensor:
    """mean over rows with a drawn nodule of max(0, Rg(drawn) − Rg(m)) in patch widths, each radius of gyration
    taken about the *real* nodule's centroid, the drawn mask gated at 0.5 as in `position_term`. Rg² about a
    point is the spread about the own centroid plus the offset², so mask drawn beside the point, scattered in
    pieces around it or as strands at the patch edge costs, while one nodule at the point no wider than the
    real one costs 0. Why: the centroid of all drawn pixels (`position_term`) is met by pieces on either side
    of the point; one training seed in three drew 20-60 % of its nodules > 5 mm off the point (README, round 30)."""
    drawn, present = _drawn_where_real(mask, real_mask)
    real = real_mask.to(mask.dtype)
    centre = _centroid(real)
    excess = (_radius_of_gyration(drawn, centre) - _radius_of_gyration(real, centre)).clamp_min(0)
    return (excess * present).sum() / mask.shape[0]


def consistency_terms(image: Tensor, mask: Tensor, real_image: Tensor, real_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(mean |area(mask) − area(real_mask)|, mean |mean(image | mask) − mean(real_image | real_mask)|) over the
    batch; areas as fractions of the patch, means weighted by the (soft) masks (B,1,H,W)."""
    area = mask.mean(dim=(1, 2, 3))
    real_area = real_mask.mean(dim=(1, 2, 3))
    inside, real_inside = _masked_mean(image, mask), _masked_mean(real_image, real_mask)
    return (area - real_area).abs().mean(), (inside - real_inside).abs().mean()


LOG_AREA_FLOOR = 0.005   # of the patch (≈ 20 px, a 4.5 mm disc): the smallest area the log term tells apart


def log_area_term(mask: Tensor, real_mask: Tensor) -> Tensor:
    """mean |log((area(mask) + f) / (area(real_mask) + f))|, areas as patch fractions, f = LOG_AREA_FLOOR: the
    area's error relative to the real nodule's, so a small nodule drawn at half its size (or not at all)
    costs what a large one does; the linear area term charges it by the pixel."""
    area = mask.mean(dim=(1, 2, 3)) + LOG_AREA_FLOOR
    real_area = real_mask.to(mask.dtype).mean(dim=(1, 2, 3)) + LOG_AREA_FLOOR
    return (area.log() - real_area.log()).abs().mean()


DRAWN_TEMPERATURE = 0.05  # a near-zero background (mask 0.02) then adds < 1 px over a 64² patch; gradient from ≈ 0.3


def drawn_mask(mask: Tensor) -> Tensor:
    """sigmoid((mask − 0.5)/T): a differentiable stand-in for [mask > 0.5], the pixels the evaluation and the
    insertion's label keep. A faint fill (0.3 everywhere) is ≈ 0 here, though the soft mask's area counts it."""
    return torch.sigmoid((mask - MASK_THRESHOLD) / DRAWN_TEMPERATURE)


def core_contrast(image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) mean of `image` over the mask's inner half (within R/2 of the drawn mask's centroid, R = √(drawn
    area / π)) minus its mean over the outer half, the halves weighted by the soft mask; and (B,) whether the
    row has at least CORE_MIN_PX drawn pixels. The geometry carries no gradient: the term shapes the inside.
    `metrics.core_contrast_hu` is the evaluation's measure of the same."""
    size = mask.shape[-1]
    with torch.no_grad():
        drawn = (mask > MASK_THRESHOLD).to(mask.dtype)
        pixels = drawn.sum(dim=(1, 2, 3))
        centre = _centroid(drawn) * size + (size - 1) / 2               # (B, 2) in pixels
        axis = torch.arange(size, device=mask.device, dtype=mask.dtype)
        distance = ((axis[None, :, None] - centre[:, 0, None, None]).square()
                    + (axis[None, None, :] - centre[:, 1, None, None]).square()).sqrt()[:, None]
        radius = (pixels / math.pi).sqrt().clamp_min(1.0)[:, None, None, None]
        inner = (distance < radius / 2).to(mask.dtype) * mask
        outer = mask.detach() - inner
    return _masked_mean(image, inner) - _masked_mean(image, outer), pixels >= CORE_MIN_PX


def core_term(image: Tensor, mask: Tensor, real_image: Tensor, real_mask: Tensor) -> Tensor:
    """Sum over rows where both nodules are large enough of |core(Gx, Gm) − core(x, m)|, over the batch size."""
    generated, drawn = core_contrast(image, mask)
    real, real_drawn = core_contrast(real_image, real_mask.to(image.dtype))
    both = (drawn & real_drawn).to(image.dtype)
    return ((generated - real).abs() * both).sum() / image.shape[0]


SPICULE_SCALE_PX = 4.0   # thin-strand pixels: the real nodule slices' mean (3.9, cohort 2026); costs the weight


def _cross_shifts(mask: Tensor) -> Tensor:
    """(5, B, 1, H, W): the mask and its four edge-neighbours (outside the patch 0, scipy's border value)."""
    padded = F.pad(mask, (1, 1, 1, 1))
    return torch.stack([mask, padded[..., :-2, 1:-1], padded[..., 2:, 1:-1], padded[..., 1:-1, :-2],
                        padded[..., 1:-1, 2:]])


def thin_strand_area(mask: Tensor) -> Tensor:
    """(B,) Σ (m − opening(m)), the opening a grey erosion then dilation by the 3×3 cross: the mask's parts at most
    about 2 px wide (spicules), in pixels. On a binary mask it counts exactly the pixels `metrics.spicule_area_mm2`
    measures; on a soft one a ramp is kept whole, so a blurred edge is not a strand. Differentiable (min/max)."""
    eroded = _cross_shifts(mask).amin(dim=0)
    opened = _cross_shifts(eroded).amax(dim=0)
    return (mask - opened).sum(dim=(1, 2, 3))


def spicule_term(mask: Tensor, real_mask: Tensor) -> Tensor:
    """mean over the batch of |thin strands of the drawn mask − those of the real one| / SPICULE_SCALE_PX: asks a
    spiculated donor's nodule to be drawn with strands and a smooth one without. On the drawn mask
    (`drawn_mask`), the pixels the evaluation and the label keep."""
    real = thin_strand_area(real_mask.to(mask.dtype))
    return (thin_strand_area(drawn_mask(mask)) - real).abs().mean() / SPICULE_SCALE_PX


def augment_alike(tensors: Sequence[Tensor], draws: Tensor, probability: float) -> tuple[Tensor, ...]:
    """DiffAugment's translation and cutout (Zhao et al. 2020), the same for every tensor of one tuple (an image
    and its masks) and differentiable in them. `draws` (B, 5) uniform [0, 1): row b is augmented when
    draws[b, 0] < `probability`, then shifted by up to S/8 px in each axis (edges replicated) and a S/2 square
    centred at (draws[b, 3], draws[b, 4])·S is set to 0."""
    first = tensors[0]
    rows, size = first.shape[0], first.shape[-1]
    pad = size // 8
    draws = draws.to(first.device, torch.float32)
    on = draws[:, 0] < probability
    shift = torch.round((2 * draws[:, 1:3] - 1) * pad).long() * on[:, None]
    axis = torch.arange(size, device=first.device)
    index_r = axis[None, :] + pad - shift[:, :1]                      # (B, S): source row of each output row
    index_c = axis[None, :] + pad - shift[:, 1:]
    centre = (draws[:, 3:5] * size).long()
    half = size // 4
    inside_r = (axis[None, :] - centre[:, :1]).abs() < half
    inside_c = (axis[None, :] - centre[:, 1:]).abs() < half
    cut = (inside_r[:, :, None] & inside_c[:, None, :] & on[:, None, None])[:, None]
    batch_index = torch.arange(rows, device=first.device)[:, None, None]
    out = []
    for tensor in tensors:
        padded = F.pad(tensor, (pad, pad, pad, pad), mode="replicate")
        moved = padded[batch_index, :, index_r[:, :, None], index_c[:, None, :]].permute(0, 3, 1, 2)
        out.append(moved.masked_fill(cut, 0.0))
    return tuple(out)


QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def quantile_term(image: Tensor, mask: Tensor, real_image: Tensor, real_mask: Tensor) -> Tensor:
    """Sum over rows where both nodules have ≥ CORE_MIN_PX drawn pixels of the mean |decile difference| of the
    image inside [mask > ½] and of the real image inside the real mask, over the batch size. The masks carry no
    gradient: the term shapes the values inside."""
    levels = torch.tensor(QUANTILES, dtype=torch.float32, device=image.device)
    drawn, real_drawn = mask.detach() > MASK_THRESHOLD, real_mask > MASK_THRESHOLD
    total = image.new_zeros(())
    for row in range(image.shape[0]):
        if int(drawn[row].sum()) < CORE_MIN_PX or int(real_drawn[row].sum()) < CORE_MIN_PX:
            continue
        generated = torch.quantile(image[row][drawn[row]].float(), levels)
        real = torch.quantile(real_image[row][real_drawn[row]].float(), levels)
        total = total + (generated - real).abs().mean().to(total.dtype)
    return total / image.shape[0]


LEAK_BAND_PX = (1.0, 4.0)   # the band-pass's Gaussian widths: vessel- and wall-sized structure, not the nodule
LEAK_ERODE_PX = 2            # the drawn mask's rim blends nodule and background by design: left out
LEAK_MIN_VARIANCE = 1e-5     # (≈ 2.4 HU)²: a background this flat has no structure to show; such rows add 0


def gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """(B,1,H,W) blurred by a separable Gaussian of `sigma` px (radius 3σ, edges replicated)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=image.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma).square())
    kernel = (kernel / kernel.sum()).to(image.dtype)
    padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(F.conv2d(padded, kernel.view(1, 1, -1, 1)), kernel.view(1, 1, 1, -1))


def band_pass(image: Tensor, region: Tensor) -> Tensor:
    """Structure between the two `LEAK_BAND_PX` scales inside `region` (B,1,H,W) {0,1}: blur(σ₁) − blur(σ₂), each
    a normalised convolution over the region only, so nothing outside it (the lung around a nodule) enters."""
    scales = []
    for sigma in LEAK_BAND_PX:
        scales.append(gaussian_blur(image * region, sigma) / gaussian_blur(region, sigma).clamp_min(1e-3))
    return (scales[0] - scales[1]) * region


def background_leak(image: Tensor, mask: Tensor, background: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) β, the least-squares slope of band_pass(image) on band_pass(background) over the inside of
    [mask > ½] (eroded by LEAK_ERODE_PX); and (B,) whether the row counts: ≥ CORE_MIN_PX inside pixels and a
    background band-pass variance ≥ LEAK_MIN_VARIANCE there (the unseen cohort's 1st percentile is 5e-5). β = 1 where
    the background shows through unchanged, 0 where the nodule replaces it (a flat nodule: exactly 0). Gradient
    flows to `image` only."""
    with torch.no_grad():
        drawn = (mask.detach() > MASK_THRESHOLD).to(image.dtype)
        inside = 1.0 - square_dilation(1.0 - drawn, LEAK_ERODE_PX)
        structure = band_pass(background.to(image.dtype), inside)
        structure = structure - _masked_mean(structure, inside)[:, None, None, None]
        variance = _masked_mean(structure.square(), inside)
        counted = (inside.sum(dim=(1, 2, 3)) >= CORE_MIN_PX) & (variance >= LEAK_MIN_VARIANCE)
    shown = band_pass(image, inside)
    slope = _masked_mean(shown * structure, inside) / variance.clamp_min(LEAK_MIN_VARIANCE)
    return slope, counted


def leak_term(image: Tensor, mask: Tensor, background: Tensor) -> Tensor:
    """Sum over the rows that count of β² (`background_leak`), over the batch size."""
    slope, counted = background_leak(image, mask, background)
    return (slope.square() * counted.to(slope.dtype)).sum() / image.shape[0]


def gradient_magnitude(image: Tensor) -> Tensor:
    """|∇image| per pixel by central differences (edges replicated), shape of `image` (B,1,H,W)."""
    padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
    gy = (padded[:, :, 2:, 1:-1] - padded[:, :, :-2, 1:-1]) / 2
    gx = (padded[:, :, 1:-1, 2:] - padded[:, :, 1:-1, :-2]) / 2
    return torch.sqrt(gx.square() + gy.square() + 1e-8)


def _smooth(mask: Tensor) -> Tensor:
    """A [1, 2, 1]/4 blur in both axes: a binary mask's staircase and a soft mask then measure alike."""
    kernel = torch.tensor([0.25, 0.5, 0.25], dtype=mask.dtype, device=mask.device)
    kernel = (kernel[:, None] * kernel[None, :]).reshape(1, 1, 3, 3)
    return F.conv2d(F.pad(mask, (1, 1, 1, 1), mode="replicate"), kernel)


def edge_profile(image: Tensor, mask: Tensor, far_px: tuple[int, int] = (3, 5)) -> Tensor:
    """(B, 2) the mean image on the mask's inner boundary layer and on its outer layer, each minus the mean on
    a ring `far_px` pixels outside: the two numbers the evaluation's margin sharpness (`metrics.
    margin_sharpness`, (a − b)/(a + b − 2·lo)) is made of. Matching both matches the sharpness and the edge's
    height without dividing by a height that can be ≈ 0 (that ratio, tried as a loss, emptied the masks).
    Differentiable in the image and a soft mask; an empty mask gives (0, 0)."""
    eroded = 1 - square_dilation(1 - mask, 1)
    inner, outer = mask - eroded, square_dilation(mask, 1) - mask
    far = (square_dilation(mask, far_px[1]) - square_dilation(mask, far_px[0] - 1)).clamp(0, 1)
    lo = _masked_mean(image, far)
    return torch.stack([_masked_mean(image, inner) - lo, _masked_mean(image, outer) - lo], dim=1)


def soft_margin_sharpness(image: Tensor, mask: Tensor, eps: float = 0.05) -> Tensor:
    """(B,) (a − b)/(a + b) of the `edge_profile`: the evaluation's margin sharpness in pixels⁻¹, ≈ 1/edge
    width, independent of how dense the nodule is. For tests and diagnostics; the loss matches the profile."""
    profile = edge_profile(image, mask)
    return (profile[:, 0] - profile[:, 1]) / (profile.sum(dim=1).abs() + eps)


def soft_compactness(mask: Tensor) -> Tensor:
    """(B,) 4π·area / perimeter², the perimeter as the (smoothed) mask's total variation: ≈ 1 for a disc,
    lower for lobulated or spiculated outlines; 0 for an empty mask. Differentiable in a soft mask."""
    smooth = _smooth(mask)
    area = smooth.sum(dim=(1, 2, 3))
    perimeter = gradient_magnitude(smooth).sum(dim=(1, 2, 3))
    return (4 * torch.pi * area / (perimeter.square() + 1.0)).clamp(max=1.5)


def edge_consistency_terms(image: Tensor, mask: Tensor, real_image: Tensor, real_mask: Tensor
                           ) -> tuple[Tensor, Tensor]:
    """(mean over the batch of Σ |edge profile − real edge profile|, mean |compactness − real compactness|)."""
    with torch.no_grad():
        real_profile = edge_profile(real_image, real_mask)
        real_compactness = soft_compactness(real_mask)
    return ((edge_profile(image, mask) - real_profile).abs().sum(dim=1).mean(),
            (soft_compactness(mask) - real_compactness).abs().mean())


def r1_penalty(real_scores: list[Tensor], real_image: Tensor) -> Tensor:
    """R1 (Mescheder et al. 2018): E‖∇ₓ Σ_heads D(x)‖² over the real images x, with a graph for the D step's
    backward. One gradient for all heads' real scores, which share the real image."""
    total = torch.stack([scores.float().sum() for scores in real_scores]).sum()
    (grad,) = torch.autograd.grad(total, real_image, create_graph=True)
    return grad.float().square().sum(dim=(1, 2, 3)).mean()


def code_phenotype_term(code: Tensor | None, batch: Mapping[str, Tensor], anchor_sd: float = 1.0) -> Tensor:
    """mean over the batch and the F anchored coordinates of (φ(g)[:, :F] − anchor_sd · phenotype)²."""
    _require(batch, ("phenotype",))
    target = batch["phenotype"]
    if code is None or code.shape[1] < target.shape[1]:
        raise ValueError(f"the code-phenotype term needs a gene code of at least {target.shape[1]} coordinates")
    return (code[:, : target.shape[1]] - anchor_sd * target.to(code.dtype)).square().mean()


MODE_SEEKING_DILATION_PX = 3    # the evaluation's `dilation_px`: the same region as its noise diversity
_MEAN_NORMAL_L1 = 2.0 / math.sqrt(math.pi)  # E|z − z′| per coordinate for independent z, z′ ~ N(0, 1)


def mode_seeking_term(image: Tensor, mask: Tensor, other_image: Tensor, other_mask: Tensor, noise: Tensor,
                      other_noise: Tensor, target: float) -> Tensor:
    """mean over rows of relu(1 − r/τ), r = mean |Gx − Gx′| ([0, 1] units) inside the dilated union of the two
    binarised masks, divided by |z − z′| / E|z − z′| (mean over noise coordinates). 0 once every pair differs
    by τ per typical noise distance; rows whose masks are both empty contribute 1 without gradient."""
    union = (torch.maximum(mask, other_mask) > MASK_THRESHOLD).to(image.dtype)
    region = square_dilation(union, MODE_SEEKING_DILATION_PX).detach()
    difference = _masked_mean((image - other_image).abs() * 0.5, region)
    noise_distance = (noise - other_noise).abs().mean(dim=1) / _MEAN_NORMAL_L1
    ratio = difference / noise_distance.clamp_min(1e-3).to(difference.dtype)
    return F.relu(1.0 - ratio / target).mean()


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily stop `module`'s parameters from requiring grad (D in the G step): no wasted backward
    work into D and no stale gradients left on it."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _require(batch: Mapping[str, Tensor], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing} (has {sorted(batch)})")


def _logs(values: dict[str, Tensor]) -> dict[str, float]:
    """Detached scalars → floats with a single device sync."""
    names = list(values)
    flat = torch.stack([values[n].detach().float().reshape(()) for n in names]).tolist()
    return dict(zip(names, flat))


# -- the loss object -----------------------------------------------------------------------------------


class GANLoss:
    """Runs G and D and computes the D-step and G-step losses for any of the three generator kinds.

    One `run_generator` output may serve both steps (the D step detaches it; the G step re-scores it with
    the updated D), which saves a generator forward per iteration.
    """

    def __init__(self, generator: nn.Module, discriminator: Discriminator, weights: LossWeights | None = None) -> None:
        self.generator = generator
        self.discriminator = discriminator
        self.weights = weights or LossWeights()
        gcfg, dcfg = generator.config, discriminator.config
        self.kind: str = gcfg.kind
        self.anchor_sd = float(gcfg.anchor_sd)
        if self.kind not in KINDS:
            raise ValueError(f"unknown generator kind {self.kind!r}; expected one of {KINDS}")
        if gcfg.patch_size != dcfg.patch_size:
            raise ValueError(f"patch size: generator {gcfg.patch_size}, discriminator {dcfg.patch_size}")
        self.uses_genes = self.kind != "inpainting"
        if self.uses_genes != dcfg.gene_conditioned:
            raise ValueError(
                f"a {self.kind!r} generator needs a discriminator with gene_conditioned={self.uses_genes} "
                "(use DiscriminatorConfig.for_generator)"
            )
        if self.uses_genes:
            if dcfg.independent_mapping and dcfg.num_genes != gcfg.num_genes:
                raise ValueError(f"genes: generator {gcfg.num_genes}, discriminator {dcfg.num_genes}")
            if not dcfg.independent_mapping and dcfg.code_dim != gcfg.code_dim:
                raise ValueError(f"code size: generator {gcfg.code_dim}, discriminator {dcfg.code_dim}")

    # -- generator -------------------------------------------------------------------------------------
    def hole(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The inpainting hole of this batch: a disc of hole_scale × the real nodule's radius."""
        return hole_from_mask(batch["mask"], self.weights.hole_scale)

    def run_generator(self, batch: Mapping[str, Tensor], noise: Tensor | None = None) -> GeneratorOutput:
        """G's output for the batch: (background b, genes g, noise) for proposed/mcgan; for inpainting the
        real slice x with the hole over its nodule (G erases and refills it)."""
        if self.kind == "inpainting":
            _require(batch, ("image", "mask"))
            return self.generator(batch["image"], None, None, hole=self.hole(batch))
        _require(batch, ("background", "genes"))
        extra: dict[str, Tensor] = {}
        if self.generator.config.slice_position:   # G draws the slice of the paired real one's place
            _require(batch, ("position",))
            extra["position"] = batch["position"]
        if getattr(self.generator.config, "pixel_noise", False):   # keyed per item: resume stays bit-exact
            _require(batch, ("pixel_noise",))
            extra["pixel_noise"] = batch["pixel_noise"]
        return self.generator(batch["background"], batch["genes"], noise, **extra)

    # -- D's scores of every tuple of the paper's equations ---------------------------------------------
    def _codes(self, batch: Mapping[str, Tensor], fake: GeneratorOutput, *, g_step: bool) -> tuple[Tensor, ...]:
        """D_ISG's codes of (real g, fake g, ḡ). φ(g) and φ(ḡ) come from G's mapping without gradient (decision
        5); only in the G step does the fake tuple's φ(g) keep its gradient, so the mapping learns from G's
        loss alone. With ``independent_mapping`` D maps the raw genes itself."""
        d = self.discriminator
        genes, wrong = batch["genes"], batch["wrong_genes"]
        if d.config.independent_mapping:
            codes = d.gene_code(torch.cat([genes, wrong]))
            return codes[: len(genes)], codes[: len(genes)], codes[len(genes) :]
        with torch.no_grad():
            code_g = fake.gene_code if fake.gene_code is not None else self.generator.encode_genes(genes)
            code_wrong = self.generator.encode_genes(wrong)
        code_g = code_g.detach()
        code_fake = code_g
        if g_step:
            if fake.gene_code is None:
                raise ValueError(f"a {self.kind!r} generator must return its gene code φ(g)")
            code_fake = fake.gene_code
        return d.gene_code(code_g), d.gene_code(code_fake), d.gene_code(code_wrong.detach())

    def _score_tuples(
        self, batch: Mapping[str, Tensor], fake: GeneratorOutput, *, g_step: bool
    ) -> dict[str, Tensor]:
        """Scores of every tuple, one stacked pass per encoder; identical composition in the D and G step."""
        keys = ("image", "mask", "wrong_mask") + (("genes", "wrong_genes") if self.uses_genes else ())
        _require(batch, keys)
        d = self.discriminator
        x, m, wrong_mask = batch["image"], batch["mask"], batch["wrong_mask"]
        gx, gm = (fake.image, fake.mask) if g_step else (fake.image.detach(), fake.mask.detach())
        if self.weights.d_augment:
            _require(batch, ("augment",))
            x, m, wrong_mask = augment_alike((x, m, wrong_mask), batch["augment"][:, 0], self.weights.d_augment)
            gx, gm = augment_alike((gx, gm), batch["augment"][:, 1], self.weights.d_augment)
        n = x.shape[0]
        d_i = d.score_image(d.image_features(d.image_view(torch.cat([x, gx]), torch.cat([m, gm]))))
        pair = d.pair_features(torch.cat([x, x, gx]), torch.cat([m, wrong_mask, gm]))
        d_is = d.score_pair(pair)
        scores = {
            "i_real": d_i[:n], "i_fake": d_i[n:],
            "is_real": d_is[:n], "is_wrong_mask": d_is[n : 2 * n], "is_fake": d_is[2 * n :],
        }  # fmt: skip
        if self.uses_genes:
            code_g, code_fake, code_wrong = self._codes(batch, fake, g_step=g_step)
            # tuples: (x, m, g), (x, m̄, g), (Gx, Gm, g) from `pair`, then (x, m, ḡ) reusing (x, m).
            d_isg = d.score_gene(torch.cat([pair, pair[:n]]), torch.cat([code_g, code_g, code_fake, code_wrong]))
            scores |= {
                "isg_real": d_isg[:n], "isg_wrong_mask": d_isg[n : 2 * n],
                "isg_fake": d_isg[2 * n : 3 * n], "isg_wrong_gene": d_isg[3 * n :],
            }  # fmt: skip
        return scores

    # -- D step ---------------------------------------------------------------------------------------
    def discriminator_loss(self, batch: Mapping[str, Tensor], fake: GeneratorOutput) -> tuple[Tensor, dict[str, float]]:
        """L_D = w_I·L_DI + w_IS·L_DIS (+ w_ISG·L_DISG); `fake` is detached here."""
        w = self.weights
        with_r1 = bool(w.r1) and torch.is_grad_enabled()   # no graph (a loss only logged): no penalty
        if with_r1:
            batch = {**batch, "image": batch["image"].detach().requires_grad_(True)}
        s = self._score_tuples(batch, fake, g_step=False)
        t: dict[str, Tensor] = {
            "d_i_real": ls_term(s["i_real"], 1.0),
            "d_i_fake": ls_term(s["i_fake"], 0.0),
            "d_is_real": ls_term(s["is_real"], 1.0),
            "d_is_wrong_mask": ls_term(s["is_wrong_mask"], 0.0),
            "d_is_fake": ls_term(s["is_fake"], 0.0),
        }
        loss = w.d_i * (t["d_i_real"] + t["d_i_fake"]) + w.d_is * (
            t["d_is_real"] + t["d_is_wrong_mask"] + t["d_is_fake"]
        )
        real = w.d_i * t["d_i_real"] + w.d_is * t["d_is_real"]
        fake_sum = w.d_i * t["d_i_fake"] + w.d_is * t["d_is_fake"]
        wrong_sum = w.d_is * t["d_is_wrong_mask"]
        if self.uses_genes:
            t["d_isg_real"] = ls_term(s["isg_real"], 1.0)
            t["d_isg_wrong_mask"] = ls_term(s["isg_wrong_mask"], 0.0)
            t["d_isg_fake"] = ls_term(s["isg_fake"], 0.0)
            t["d_isg_wrong_gene"] = ls_term(s["isg_wrong_gene"], 0.0)
            loss = loss + w.d_isg * (t["d_isg_real"] + t["d_isg_wrong_mask"] + t["d_isg_wrong_gene"] + t["d_isg_fake"])
            real = real + w.d_isg * t["d_isg_real"]
            fake_sum = fake_sum + w.d_isg * t["d_isg_fake"]
            wrong_sum = wrong_sum + w.d_isg * (t["d_isg_wrong_mask"] + t["d_isg_wrong_gene"])
        if with_r1:
            real_scores = [s[k] for k in ("i_real", "is_real", "isg_real") if k in s]
            t["d_r1"] = r1_penalty(real_scores, batch["image"])
            loss = loss + w.r1 / 2 * t["d_r1"]
        logs = {
            "d_total": loss,
            "d_real": real,
            "d_fake": fake_sum,
            "d_wrong": wrong_sum,
            **t,
            "score_i_real": s["i_real"].mean(),
            "score_i_fake": s["i_fake"].mean(),
        }
        return loss, _logs(logs)

    # -- G step ---------------------------------------------------------------------------------------
    @property
    def seeks_modes(self) -> bool:
        """Whether the G step wants a `SecondDraw` (the mode-seeking term is on and G takes noise)."""
        return bool(self.weights.mode_seeking) and self.uses_genes and self.generator.config.noise_dim > 0

    def seeks_modes_at(self, step: int) -> bool:
        """Whether the G step of 0-based `step` wants a `SecondDraw` (every `mode_seeking_every`-th step)."""
        return self.seeks_modes and step % self.weights.mode_seeking_every == 0

    def generator_loss(self, batch: Mapping[str, Tensor], fake: GeneratorOutput, second: SecondDraw | None = None
                       ) -> tuple[Tensor, dict[str, float]]:
        """L_G: adversarial terms towards 1 + the L1 term (background L1, or hole L1 for inpainting); with
        `second` (and the mode-seeking weight on) also the mode-seeking term.
        D's parameters are frozen during this forward, so only G receives gradient; D scores the same stacked
        batch as in the D step and only the fake rows enter the loss."""
        gx, gm = fake.image, fake.mask
        w = self.weights
        with frozen(self.discriminator):
            s = self._score_tuples(batch, fake, g_step=True)
        t: dict[str, Tensor] = {"g_i": ls_term(s["i_fake"], 1.0), "g_is": ls_term(s["is_fake"], 1.0)}
        adv = w.d_i * t["g_i"] + w.d_is * t["g_is"]
        if self.uses_genes:
            t["g_isg"] = ls_term(s["isg_fake"], 1.0)
            adv = adv + w.d_isg * t["g_isg"]
        if self.kind == "inpainting":
            _require(batch, ("image", "mask"))
            region = self.hole(batch)
            l1 = masked_l1(gx, batch["image"], region)
            l1_weight = w.hole_l1
        else:
            _require(batch, ("background",))
            region = eroded_background_mask(gm, w.erosion_kernel)
            l1 = masked_l1(gx, batch["background"], region)
            l1_weight = w.background_l1
        loss = adv + l1_weight * l1
        if self.uses_genes and (w.consistency_area or w.consistency_intensity):
            area, intensity = consistency_terms(gx, gm, batch["image"], batch["mask"])
            t["g_consistency_area"], t["g_consistency_intensity"] = area, intensity
            loss = loss + w.consistency_area * area + w.consistency_intensity * intensity
        if self.uses_genes and (w.consistency_margin or w.consistency_shape):
            margin, shape = edge_consistency_terms(gx, gm, batch["image"], batch["mask"])
            t["g_consistency_margin"], t["g_consistency_shape"] = margin, shape
            loss = loss + w.consistency_margin * margin + w.consistency_shape * shape
        if self.uses_genes and w.consistency_log_area:
            t["g_consistency_log_area"] = log_area_term(gm, batch["mask"])
            loss = loss + w.consistency_log_area * t["g_consistency_log_area"]
        if self.uses_genes and w.consistency_drawn_area:
            t["g_consistency_drawn_area"] = log_area_term(drawn_mask(gm), batch["mask"])
            loss = loss + w.consistency_drawn_area * t["g_consistency_drawn_area"]
        if self.uses_genes and w.consistency_core:
            t["g_consistency_core"] = core_term(gx, gm, batch["image"], batch["mask"])
            loss = loss + w.consistency_core * t["g_consistency_core"]
        if self.uses_genes and w.consistency_quantiles:
            t["g_consistency_quantiles"] = quantile_term(gx, gm, batch["image"], batch["mask"])
            loss = loss + w.consistency_quantiles * t["g_consistency_quantiles"]
        if self.uses_genes and w.consistency_spicules:
            t["g_consistency_spicules"] = spicule_term(gm, batch["mask"])
            loss = loss + w.consistency_spicules * t["g_consistency_spicules"]
        if self.uses_genes and w.background_leak:
            t["g_background_leak"] = leak_term(gx, gm, batch["background"])
            loss = loss + w.background_leak * t["g_background_leak"]
        if self.uses_genes and w.consistency_position:
            t["g_consistency_position"] = position_term(gm, batch["mask"])
            loss = loss + w.consistency_position * t["g_consistency_position"]
        if self.uses_genes and w.consistency_spread:
            t["g_consistency_spread"] = spread_term(gm, batch["mask"])
            loss = loss + w.consistency_spread * t["g_consistency_spread"]
        if self.uses_genes and w.code_phenotype:
            t["g_code_phenotype"] = code_phenotype_term(fake.gene_code, batch, self.anchor_sd)
            loss = loss + w.code_phenotype * t["g_code_phenotype"]
        if self.seeks_modes and second is not None:
            rows = second.output.image.shape[0]
            t["g_mode_seeking"] = mode_seeking_term(gx[:rows], gm[:rows], second.output.image, second.output.mask,
                                                    second.noise, second.other_noise, w.mode_seeking_target)
            loss = loss + w.mode_seeking * w.mode_seeking_every * t["g_mode_seeking"]
        logs = {
            "g_total": loss,
            "g_adv": adv,
            "g_l1": l1,
            **t,
            "l1_region_fraction": region.mean(),
            "mask_mean": gm.detach().mean(),
        }
        return loss, _logs(logs)
