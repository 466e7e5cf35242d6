"""The one tree representation that prediction, text, DOT, explain and audit all read.

:class:`TreeArrays` holds plain node arrays (like sklearn's ``tree_`` but owned by us, so a saved
surrogate reloads without unpickling anything). Left children hold rows with ``x[feature] <= threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEAF = -1


@dataclass
class TreeArrays:
    """Node arrays of a fitted tree.

    Attributes
    ----------
    children_left, children_right : ndarray of int, shape (n_nodes,)
        Child indices, ``-1`` at leaves.
    feature : ndarray of int, shape (n_nodes,)
        Concept index split on (``-1`` at leaves).
    threshold : ndarray of float, shape (n_nodes,)
    value : ndarray of float, shape (n_nodes, n_classes)
        Class proportions of the (soft) training weight reaching the node.
    weight : ndarray of float, shape (n_nodes,)
        (Soft) training weight reaching the node, as a fraction of the root's.
    impurity : ndarray of float, shape (n_nodes,)
        Gini impurity of ``value``.
    """

    children_left: np.ndarray
    children_right: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    value: np.ndarray
    weight: np.ndarray
    impurity: np.ndarray

    @classmethod
    def from_sklearn(cls, tree, n_classes: int) -> TreeArrays:
        """Copy a fitted ``DecisionTreeClassifier`` whose classes are a subset of ``range(n_classes)``."""
        t = tree.tree_
        value = np.zeros((t.node_count, n_classes))
        raw = t.value[:, 0, :]
        raw = raw / np.maximum(raw.sum(1, keepdims=True), 1e-300)
        value[:, tree.classes_.astype(int)] = raw
        w = t.weighted_n_node_samples.astype(float)
        return cls(children_left=t.children_left.astype(np.int64), children_right=t.children_right.astype(np.int64),
                   feature=np.where(t.children_left == LEAF, -1, t.feature).astype(np.int64),
                   threshold=np.where(t.children_left == LEAF, 0.0, t.threshold).astype(float),
                   value=value, weight=w / w[0], impurity=1.0 - (value ** 2).sum(1))

    FIELDS = ("children_left", "children_right", "feature", "threshold", "value", "weight", "impurity")

    def to_arrays(self, prefix: str = "tree_") -> dict[str, np.ndarray]:
        return {prefix + f: getattr(self, f) for f in self.FIELDS}

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "tree_") -> TreeArrays:
        return cls(**{f: np.asarray(arrays[prefix + f]) for f in cls.FIELDS})

    @property
    def n_nodes(self) -> int:
        return len(self.feature)

    def is_leaf(self, node: int) -> bool:
        return self.children_left[node] == LEAF

    @property
    def n_leaves(self) -> int:
        return int((self.children_left == LEAF).sum())

    @property
    def depth(self) -> int:
        return max(len(p) - 1 for p in self._all_paths())

    def _all_paths(self):
        stack = [[0]]
        while stack:
            path = stack.pop()
            node = path[-1]
            if self.is_leaf(node):
                yield path
            else:
                stack.append(path + [int(self.children_right[node])])
                stack.append(path + [int(self.children_left[node])])

    def leaf_paths(self) -> dict[int, list[int]]:
        """Leaf index -> node indices from the root to that leaf."""
        return {p[-1]: p for p in self._all_paths()}

    def decision_path(self, x: np.ndarray) -> list[int]:
        """Node indices visited by one row ``x``, root first, leaf last."""
        node, path = 0, [0]
        while not self.is_leaf(node):
            node = int(self.children_left[node] if x[self.feature[node]] <= self.threshold[node]
                       else self.children_right[node])
            path.append(node)
        return path

    def apply(self, X: np.ndarray) -> np.ndarray:
        """Leaf index for every row of ``X`` (vectorised over rows)."""
        X = np.asarray(X, dtype=float)
        node = np.zeros(len(X), dtype=np.int64)
        active = ~self._leaf_mask()[node]
        while active.any():
            idx = np.nonzero(active)[0]
            nd = node[idx]
            go_left = X[idx, self.feature[nd]] <= self.threshold[nd]
            node[idx] = np.where(go_left, self.children_left[nd], self.children_right[nd])
            active[idx] = ~self._leaf_mask()[node[idx]]
        return node

    def _leaf_mask(self):
        return self.children_left == LEAF

    def importances(self, n_features: int) -> np.ndarray:
        """Weighted Gini decrease per feature, ``sum_nodes w_n g_n - w_l g_l - w_r g_r``, normalised."""
        imp = np.zeros(n_features)
        for n in range(self.n_nodes):
            if self.is_leaf(n):
                continue
            left, right = self.children_left[n], self.children_right[n]
            imp[self.feature[n]] += (self.weight[n] * self.impurity[n] - self.weight[left] * self.impurity[left]
                                     - self.weight[right] * self.impurity[right])
        s = imp.sum()
        return imp / s if s > 0 else imp
