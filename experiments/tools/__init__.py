"""Tools: calibrating per-layer, per-head thresholds, and an attention-only demo on synthetic inputs."""
