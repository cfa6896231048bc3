"""Run machinery a first reading may skip: flags and presets (runs), what each task loads (tasks), the run folder
(rundir), checkpoints, tagging thresholds (thresholds), atomic writes (safe_io), torchrun (parallel), and the
file formats of others: CLIP checkpoints (clip_files, clip_convert), CLIP's BPE tokenizer, datasets
(data_formats), score files."""
