"""Synthetic concept data shared by tests that need a SurrogateModel without a teacher network."""

import numpy as np
import pandas as pd

CONCEPTS = ["fur", "whiskers", "stripes", "horns"]
CLASSES = ["cat", "tiger", "cow", "dog"]


def synthetic(n: int = 240, seed: int = 0):
    """Activations of one layer whose first 4 columns encode the concepts; logits from the concepts.

    Returns ``({"layer4": acts}, labels, logits)``: cat = fur and whiskers, tiger = stripes, cow = horns.
    """
    rng = np.random.default_rng(seed)
    present = (rng.random((n, 4)) < 0.5).astype(int)
    labels = pd.DataFrame(present, columns=CONCEPTS)
    acts = rng.normal(0, 1, (n, 16))
    acts[:, :4] += 2.5 * present
    fur, whiskers, stripes, horns = present.T.astype(float)
    logits = np.stack([4 * fur * whiskers, 3 * stripes, 2 * horns, 1.0 + 0 * fur], 1) + rng.normal(0, 0.3, (n, 4))
    return {"layer4": acts}, labels, logits
