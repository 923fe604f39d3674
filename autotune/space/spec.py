"""`space.yaml` -> a validated Spec, or one clear line that names the field, the value and the fix.

Only `yaml.safe_load`-level constructs are accepted, with a size limit, no runaway nesting, no
duplicate keys and a bound on alias expansion, so a hostile or broken file can never do more
than fail. Every failure is a `SpecError` whose text is a single line shaped like

    <file>: <field path>: <value> <what is wrong>; <what to do>

What is a spec error, and what the command line makes of it:

* exit 2 -- the file (or the command line) is wrong: it cannot be read or parsed, a key is
  unknown, a value has the wrong type or range, sections disagree (cluster.ranks against
  nodes x ranks_per_node, a world size larger than the cluster), or a search list holds no
  value that could ever give a valid layout on its own (no `ep` divides model.n_experts, no
  `tp` divides the heads and widths, no `pp` divides model.n_layers, or even the smallest
  degrees need more ranks than the largest world size). Those are properties of one field and
  are reported against it here, when the file is loaded.
* exit 1 -- the file is well formed but screening (`autotune.predict.candidates.screen`) leaves no
  layout that fits: every combination of otherwise valid values breaks a layout rule (global
  batch divisibility, pipeline micro-batches, world sizes) or exceeds the memory cap. That is
  an answer about the space, not a mistake in the file, and `autotune validate` prints the
  screened table before its one-line error.

The checks live in four modules of this package, re-exported here so that `autotune.space.spec`
is the one name callers import: messages.py (`SpecError`, how values are shown), sections.py (the
pydantic sections and `Spec`), parse.py (the restricted YAML reader) and load.py (`load_spec`,
`spec_from_data`, pydantic's errors as one line).
"""

from autotune.space.load import MAX_SPEC_BYTES, QUICKSTART, load_spec, spec_from_data
from autotune.space.messages import SpecError
from autotune.space.parse import MAX_YAML_NODES, parse_yaml
from autotune.space.sections import (MAX_MEMORY_GB, BudgetSpec, ClusterSpec, ModelSpec, ObjectiveSpec, Precision,
                                    Recompute, ScheduleName, SearchSpec, Spec, StudySpec, TrackingSpec,
                                    TrainableSpec)

__all__ = ["MAX_MEMORY_GB", "MAX_SPEC_BYTES", "MAX_YAML_NODES", "QUICKSTART", "BudgetSpec", "ClusterSpec",
           "ModelSpec", "ObjectiveSpec", "Precision", "Recompute", "ScheduleName", "SearchSpec", "Spec", "SpecError",
           "StudySpec", "TrackingSpec", "TrainableSpec", "load_spec", "parse_yaml", "spec_from_data"]
