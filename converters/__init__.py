"""Workstation side: read source checkpoints, quantize, calibrate, write model folders (never imports the runtime)."""
