"""Offline evaluation of models and their outputs (faithfulness, calibration, general tasks)."""
