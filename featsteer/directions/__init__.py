"""Directions in activation space: the `DirectionSet` type and the methods that find them."""

from featsteer.directions.dim import Separability, difference_in_means, separability
from featsteer.directions.directions import DirectionSet, unit

__all__ = ["DirectionSet", "Separability", "difference_in_means", "separability", "unit"]
