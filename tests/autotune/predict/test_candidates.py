"""Screening gives, for every candidate, exactly what judging it alone gives."""

from __future__ import annotations

from autotune.predict.candidates import FITS, INVALID, OVER_MEMORY, judge, layouts_of, screen
from autotune.space.spec import spec_from_data


def test_screen_agrees_with_judging_each_layout_alone():
    spec = spec_from_data({
        "model": {"preset": "tiny"},
        "cluster": {"ranks": 8, "device": "cpu", "memory_gb": 0.03},
        "search": {"ep": [1, 2, 3, 4], "tp": [1, 2, 3], "pp": [1, 2, 3], "world_sizes": [1, 2, 4, 6, 8],
                   "micro_batch_size": [1, 2, 3, 8], "global_batch_size": 16, "seq_len": 64,
                   "precision": ["fp32", "bf16", "fp16"], "recompute": ["none", "selective", "full"],
                   "schedule": ["1f1b", "gpipe"]},
        "study": {"name": "s"},
    })
    sc = screen(spec)
    layouts = layouts_of(spec)
    assert [c.layout for c in sc.candidates] == layouts == sorted(set(layouts))
    alone = [judge(spec, layout) for layout in layouts]
    assert [(c.verdict, c.reason, c.prediction) for c in sc.candidates] == \
        [(c.verdict, c.reason, c.prediction) for c in alone]
    assert {FITS, INVALID, OVER_MEMORY} <= set(sc.counts)  # the space exercises all three verdicts
    assert sum(sc.counts.values()) == len(layouts)
