"""The predictions: each layout's memory and step time before it runs, and their calibration."""
