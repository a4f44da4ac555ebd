"""Channel counts scaled by a width multiplier, shared by every model family."""


def check_width(width: float) -> float:
    """``width`` as a float, or a ValueError naming what a multiplier must be."""
    if isinstance(width, bool) or not isinstance(width, int | float) or not width > 0:
        raise ValueError(f"width must be a positive number (1.0 = paper size), got {width!r}")
    return float(width)


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1 so a narrow demo model stays valid."""
    return max(1, round(channels * width))
