"""What a linear oracle reaches on the phantom biology: the ceiling quoted in `phantom.genomics`' docstring.

    .venv/bin/python Testing/benchmarks/bench_phantom_biology.py [--train 140] [--test 200]

Genes only (no images, seconds): the gene preprocessing of `training.prepare` is fitted on the training
patients of seed 1; a ridge regression (penalty by cross-validation on the training patients) maps the
prepared genes to each image module's activation; it is scored on the patients of seed 2, a cohort it never
saw. ARI: k-means (k = 4) of the predicted modules 1–3 against the true class; the raw-gene baseline is
k-means of the prepared genes themselves.

Then the gene front-ends a model can be trained with (`--gene-top-variance N --gene-components K`): k-means
ARI (mean of 5 k-means seeds) of each front-end's output on the test patients, and the test R² of a ridge from
it to each module. Why: with biology 1 the most variable genes are mostly low-expressed noisy ones, so a
top-variance selection dilutes the modules (fitted on the 44 training patients of seed 2026 and measured on
64-patient cohorts of seeds 5 / 7: 500 genes, 16 axes → ARI 0.32 / 0.18; all genes, 16 axes → 0.79 / 0.88).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.cluster import KMeans
from sklearn.linear_model import RidgeCV
from sklearn.metrics import adjusted_rand_score, r2_score

from RadiogenomicGANLib.genes import GenePreprocessing
from RadiogenomicGANLib.phantom.genomics import draw_module_activations, gene_model, gene_profile


def cohort(seed: int, patients: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log2(FPKM+1) of complete genes (P, G), activations (P, 4), classes (P,))."""
    model = gene_model()
    drawn = [draw_module_activations(i, seed) for i in range(patients)]
    fpkm = np.array([gene_profile(model, a, i, seed) for i, (_, a) in enumerate(drawn)])
    complete = model.na_probability == 0
    return (np.log2(fpkm[:, complete] + 1.0), np.array([a for _, a in drawn]),
            np.array([c for c, _ in drawn]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=140)
    parser.add_argument("--test", type=int, default=200)
    args = parser.parse_args()
    start = time.perf_counter()
    names = [n for n, p in zip(gene_model().gene_names, gene_model().na_probability) if p == 0]
    train_x, train_a, _ = cohort(1, args.train)
    test_x, test_a, test_class = cohort(2, args.test)
    prep = GenePreprocessing.fit(train_x, names)
    columns = [names.index(g) for g in prep.gene_names]
    train_z, test_z = prep.transform_log(train_x[:, columns]), prep.transform_log(test_x[:, columns])
    print(f"preprocessing: {prep.fitted_on}")
    predicted = np.zeros_like(test_a)
    for m in range(4):
        ridge = RidgeCV(alphas=np.logspace(-2, 5, 22)).fit(train_z, train_a[:, m])
        predicted[:, m] = ridge.predict(test_z)
        print(f"module {m + 1}: test R² {r2_score(test_a[:, m], predicted[:, m]):.2f} (ridge α {ridge.alpha_:.3g})")
    ari = adjusted_rand_score(test_class, KMeans(4, n_init=10, random_state=0).fit_predict(predicted[:, :3]))
    raw = adjusted_rand_score(test_class, KMeans(4, n_init=10, random_state=0).fit_predict(test_z))
    print(f"ARI of the predicted modules 1-3: {ari:.2f}; of the prepared raw genes: {raw:.2f}")
    print("front-end (top-variance genes, components): k-means ARI | ridge test R² of modules 1-4")
    for top_variance, components in ((500, 16), (2000, 16), (0, 8), (0, 16), (0, 24), (0, 32)):
        front = GenePreprocessing.fit(train_x, names, top_variance=top_variance, components=components,
                                      out_of_sample_gain=False)  # a linear probe refits its own scale
        columns = [names.index(g) for g in front.gene_names]
        train_f, test_f = front.transform_log(train_x[:, columns]), front.transform_log(test_x[:, columns])
        aris = [adjusted_rand_score(test_class, KMeans(4, n_init=10, random_state=s).fit_predict(test_f))
                for s in range(5)]
        r2 = [r2_score(test_a[:, m], RidgeCV(alphas=np.logspace(-2, 5, 22)).fit(train_f, train_a[:, m]).predict(test_f))
              for m in range(4)]
        label = f"{top_variance or 'all'} genes, {components} axes"
        print(f"  {label:>22}: ARI {np.mean(aris):.2f} | R² " + " ".join(f"{v:.2f}" for v in r2))
    print(f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
