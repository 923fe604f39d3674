"""Device profiles: the data file and a space's overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from autotune.space import devices
from autotune.space.spec import SpecError, spec_from_data

ROOT = Path(__file__).resolve().parents[3]


def _space(profile):
    return {"cluster": {"ranks": 4, "memory_gb": 1, "device": "cuda", "profile": profile},
            "search": {"global_batch_size": 8, "seq_len": 16}, "study": {"name": "x"}}


def test_every_profile_has_its_figures_and_sources():
    known = devices.profiles()
    assert set(known) >= {"cpu", "A100-80GB", "H100-SXM", "H200", "B200"}
    for name, p in known.items():
        assert p.peak_tflops["bf16"] > 0 and p.hbm_gb_s > 0 and p.intra_node_gb_s >= p.inter_node_gb_s, name
        assert p.sources, name
    # Generations in order: each newer GPU is at least as fast in bf16 and memory bandwidth.
    order = [known[n] for n in ("A100-80GB", "H100-SXM", "H200", "B200")]
    assert [p.peak_tflops["bf16"] for p in order] == sorted(p.peak_tflops["bf16"] for p in order)
    assert [p.hbm_gb_s for p in order] == sorted(p.hbm_gb_s for p in order)


def test_space_overrides_or_defines_a_profile():
    spec = spec_from_data(_space({"base": "A100-80GB", "inter_node_gb_s": 12.5}))
    p = spec.cluster.device_profile()
    assert p.inter_node_gb_s == 12.5 and p.peak_tflops["bf16"] == 312
    spec = spec_from_data(_space({"name": "mine", "peak_tflops": {"bf16": 100}, "hbm_gb_s": 1000,
                                  "intra_node_gb_s": 100, "inter_node_gb_s": 10}))
    assert spec.cluster.device_profile().name == "mine"
    assert spec_from_data(_space(None)).cluster.device_profile().name == "H100-SXM"


@pytest.mark.parametrize("profile, words", [
    ("B300", "unknown device profile 'B300'"),
    ({"base": "H100-SXM", "nvlink": 1}, "unknown field 'nvlink'"),
    ({"base": "H100-SXM", "hbm_gb_s": -1}, "cluster.profile.hbm_gb_s"),
    ({"name": "x", "peak_tflops": {"int8": 3}, "hbm_gb_s": 1, "intra_node_gb_s": 1, "inter_node_gb_s": 1},
     "cluster.profile.peak_tflops.int8"),
])
def test_bad_profiles_name_the_field(profile, words):
    with pytest.raises(SpecError) as info:
        spec_from_data(_space(profile))
    assert words in str(info.value) and "\n" not in str(info.value)


def test_bad_profile_on_the_command_line_exits_2(tmp_path):
    space = tmp_path / "s.yaml"
    space.write_text("cluster: {ranks: 4, memory_gb: 1, profile: B300}\nsearch: {global_batch_size: 8, seq_len: 16}\n"
                     "study: {name: x}\n")
    proc = subprocess.run([sys.executable, "-m", "autotune.cli", "validate", str(space)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "cluster.profile" in proc.stderr
