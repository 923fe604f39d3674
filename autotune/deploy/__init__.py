"""Deployment: studies as Ray Jobs, Kubernetes manifests and the schedules that run them."""
