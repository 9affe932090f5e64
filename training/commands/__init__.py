"""The `efficientvlm` commands: CLI, stages, demo, export / push, bench, module analysis, split comparison, X-VLM
conversion, presets and the latency harness."""
