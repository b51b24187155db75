"""A method as another package would ship it: a Method subclass, not registered with finegrain."""

from finegrain.objectives.clip import CLIP


class ToyPluginMethod(CLIP):
    """Plain CLIP under another name."""
