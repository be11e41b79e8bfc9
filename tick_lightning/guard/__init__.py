"""The gradient guard: clip or skip a spiking update on the device before it lands (``TickCallback(guard=...)``).

``spec.Guard`` says what to do; ``rules`` holds the device maths of each mode; ``skip`` makes a skip leave the
parameters and the optimizer state exactly as they were; ``engine.GuardEngine`` runs it in a fit and writes each
intervention down (``state="guard"`` rows, ``tick_lightning.load_guard``).
"""

from tick_lightning.guard.engine import GUARD_STATS, GuardEngine
from tick_lightning.guard.spec import MODES, Guard, GuardError

__all__ = ["GUARD_STATS", "MODES", "Guard", "GuardEngine", "GuardError"]
