"""Run machinery a first reading may skip: flags and presets (runs), what each task loads (tasks), the run folder
(rundir), checkpoints, tagging thresholds (thresholds), atomic writes (safe_io), torchrun (parallel), self-checking
caches (caches), the NaN guard (finite), and the file formats of others: CLIP checkpoints (clip_files,
clip_convert, torchscript_files: OpenAI's archive read without running its code), CLIP's BPE tokenizer, datasets
(data_formats), score files."""
