"""Bundles and strategy from a layout: EP x TP groups stay on one node."""

from __future__ import annotations

from autotune.space.layout import Layout
from autotune.space.spec import ClusterSpec
from autotune.trials.placement import plan


def layout(ep=1, tp=1, pp=1, dp=1) -> Layout:
    return Layout(ep, tp, pp, dp, 1, "bf16", "none")


def test_a_layout_that_fits_one_node_is_strict_pack_in_one_bundle():
    cluster = ClusterSpec(nodes=2, ranks_per_node=8, device="cuda", memory_gb=80, cpus_per_rank=4)
    p = plan(layout(ep=4, dp=2), cluster)
    assert p.strategy == "STRICT_PACK" and p.group == 8
    assert p.bundles(8) == [{"GPU": 8.0, "CPU": 32.0}]


def test_larger_layouts_keep_each_ep_tp_group_in_one_bundle():
    cluster = ClusterSpec(nodes=2, ranks_per_node=8, device="cuda", memory_gb=80, cpus_per_rank=4)
    p = plan(layout(ep=4, tp=2, dp=2), cluster)  # 16 ranks, groups of 8
    assert p.strategy == "PACK" and p.group == 8
    assert p.bundles(16) == [{"GPU": 8.0, "CPU": 32.0}] * 2
    assert [p.bundle_of(r) for r in (0, 7, 8, 15)] == [0, 0, 1, 1]


def test_a_group_larger_than_a_node_falls_back_to_one_bundle_per_rank():
    cluster = ClusterSpec(nodes=4, ranks_per_node=4, device="cuda", memory_gb=80, cpus_per_rank=2)
    p = plan(layout(ep=8, dp=2), cluster)
    assert p.group == 1 and len(p.bundles(16)) == 16 and p.strategy == "PACK"


def test_unknown_topology_packs_groups_without_forcing_one_node():
    cluster = ClusterSpec(ranks=4, device="cpu", memory_gb=1, cpus_per_rank=0.5)
    p = plan(layout(ep=2, dp=2), cluster)
    assert p.strategy == "PACK" and p.group == 2 and p.bundles(4) == [{"CPU": 1.0}, {"CPU": 1.0}]


def test_admission_counts_running_trials_and_waits_for_freed_resources_to_show():
    from autotune.trials.owner import admits, demand, free_now

    need = demand([{"CPU": 0.5}, {"CPU": 0.5}])
    assert need == {"CPU": 1.0}
    assert admits(need, [{"CPU": 1.0}], {"CPU": 2.0})
    assert not admits(need, [{"CPU": 1.5}], {"CPU": 2.0})
    assert admits({"CPU": 4.0}, [], {"CPU": 2.0})  # larger than the cluster: placement says so itself
    # Ray's view still holds a removed group's CPUs: not free yet
    assert not free_now(need, {"CPU": 0.5, "memory": 1e9})
    assert free_now(need, {"CPU": 1.0, "node:__internal_head__": 1.0})
    assert free_now({"CPU": 1.0, "custom": 5.0}, {"CPU": 1.0})  # only CPUs and GPUs are waited for
