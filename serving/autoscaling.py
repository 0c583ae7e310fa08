"""Autoscaling on robots' requests in flight, for Ray Serve's custom policy hook.

Robots' calls reach replicas over the replicas' own gRPC ports, never through
Serve handles, so Serve's built-in request counts stay at zero. Each replica
reports ``inflight`` via ``record_autoscaling_stats`` and this policy sizes the
deployment so that each replica holds about ``target`` of them.
"""

from __future__ import annotations

import math
from typing import Any


class InflightAutoscalingPolicy:
    """Ray Serve ``policy_function`` (a class: Serve constructs it with ``policy_kwargs``)."""

    def __init__(self, target: float = 64.0):
        if target <= 0:
            raise ValueError("target must be > 0")
        self.target = target

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        per_replica = (ctx.aggregated_metrics or {}).get("inflight") or {}
        total = float(sum(per_replica.values()))
        desired = math.ceil(total / self.target)
        lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        return max(lo, min(hi, desired)), {"inflight": total}
