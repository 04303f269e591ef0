"""Evaluation protocol v2 (`python -m training.evaluate`): context, generation and the registry of sections.

- `context`  — loaded models (genes prepared by each model's own preprocessing), held-out donors, generation,
  the negative controls.
- `sections` — one function per section, registered in `SECTIONS`: Table 1, gene control (with noise diversity
  and the empty-mask rate), the radiogenomic map (Fig. 4, ARI with its linear-probe ceiling), realism (C2ST over
  many critics with its real-vs-real floor), Fig. 3, module → phenotype links.
"""
