"""The space: a space file read into a validated Spec, the layouts it spans, the device profiles it names."""
