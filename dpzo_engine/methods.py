"""Compatibility alias: the release rules moved to ``dpzo_engine.zo.rules`` (README, "Layout").

Independent checks import ``dpzo_engine.methods.PrivateRule``; it keeps working.
"""

from .zo.rules import MeZORule, PrivateRule, Released

__all__ = ["MeZORule", "PrivateRule", "Released"]
