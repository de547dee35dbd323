"""Evaluation (answer extraction, sandboxed code execution, refusal metrics) lands with the
real-data issue; the spine evaluates by validation loss in HelloraModule."""
