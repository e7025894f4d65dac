"""
Test helpers.  L{FakeNetwork}: several twisted.web servers talking HTTP in
memory on one simulated clock, with seeded fault injection (L{FaultPlan}).
"""

from .faults import Fault, FaultKind, FaultPlan
from .network import FakeNetwork, RequestRecord

__all__ = ["FakeNetwork", "Fault", "FaultKind", "FaultPlan", "RequestRecord"]
