"""Probes: pure tensor functions that measure a model, and the small adapters that apply them.

Probes compute on the device and return tensors; they never convert to Python numbers or talk to MLflow.
"""
