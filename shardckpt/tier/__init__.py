"""The node-local tier (issue 28): placement of each rank's files on nodes, the holdings record
of a node's copy of a step, and the choice of the step to restore across tiers. Torch-free;
the tier's save path and config live in :mod:`shardckpt.tier.local` (which needs torch)."""

from .choice import Candidate, NodeReport, RecoveryPlan, StepReport, plan_recovery
from .holdings import HOLDINGS_NAME, HeldFile, Holdings, parse_holdings, read_holdings
from .placement import NodeMap, node_id, placement_warnings

__all__ = ["HOLDINGS_NAME", "Candidate", "HeldFile", "Holdings", "NodeMap", "NodeReport",
           "RecoveryPlan", "StepReport", "node_id", "parse_holdings", "placement_warnings",
           "plan_recovery", "read_holdings"]
