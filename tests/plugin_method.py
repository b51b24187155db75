"""A method and a term as another package would ship them: subclasses, not registered with finegrain."""

from finegrain.objectives import Term
from finegrain.objectives.clip import CLIP


class ToyPluginMethod(CLIP):
    """Plain CLIP under another name."""


class ToyTerm(Term):
    """The mean squared norm of the global image embeddings (1 for unit embeddings), read from the features
    the method's other terms share."""

    needs = frozenset({"image"})

    def loss(self, model, features, progress):
        return features["image"].pow(2).sum(-1).mean()
