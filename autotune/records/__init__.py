"""Records: what a study produced, as trial records, MLflow runs and the UIs that browse them."""
