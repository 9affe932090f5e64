"""Infrastructure the commands share: run folders (locks, atomic writes, run records), the timing harness, Trainer
callbacks and model presets. Imports nothing from `commands/`."""
