from array import array
from collections.abc import Sequence

def fill(owners: array[int], starts: Sequence[int], skips: Sequence[int], weights: Sequence[int]) -> None: ...
