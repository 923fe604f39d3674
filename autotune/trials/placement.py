"""Where a trial's ranks go: placement-group bundles and strategy chosen from the layout.

Ranks that talk most (an EP x TP group: all-to-all and tensor-parallel all-reduces every layer)
share one bundle, so Ray puts them on one node; data- and pipeline-parallel groups, which talk
once per step or per micro-batch, may spread over nodes. A layout that fits on one node is
placed STRICT_PACK.
"""

from __future__ import annotations

from dataclasses import dataclass

from autotune.space.layout import Layout
from autotune.space.spec import ClusterSpec


@dataclass(frozen=True)
class Placement:
    rank: dict[str, float]  # what each rank's task holds
    group: int  # consecutive ranks per bundle (one node)
    strategy: str  # Ray placement-group strategy over the bundles

    def bundles(self, world: int) -> list[dict[str, float]]:
        return [{k: v * self.group for k, v in self.rank.items()} for _ in range(world // self.group)]

    def bundle_of(self, rank: int) -> int:
        return rank // self.group


def rank_resources(cluster: ClusterSpec) -> dict[str, float]:
    if cluster.device == "cuda":
        return {"GPU": 1.0, "CPU": cluster.cpus_per_rank}
    return {"CPU": cluster.cpus_per_rank}


def plan(layout: Layout, cluster: ClusterSpec) -> Placement:
    rank = rank_resources(cluster)
    per_node = cluster.ranks_per_node  # known only when the space says nodes x ranks_per_node
    world = layout.world_size
    if per_node is not None and world <= per_node:
        return Placement(rank, world, "STRICT_PACK")
    group = layout.ep * layout.tp
    if per_node is not None and group > per_node:
        group = 1  # an EP x TP group larger than a node has to span nodes anyway
    return Placement(rank, group, "PACK")


def single(rank: dict[str, float], strategy: str = "PACK") -> Placement:
    """One bundle per rank: no grouping (a layout-agnostic trial)."""
    return Placement(dict(rank), 1, strategy)
