"""Run machinery a first reading may skip: the errors every command prints as one line (errors), flags and presets
(runs, cli), what each task loads (tasks), the run folder (rundir), checkpoints, the divergence guard, the NaN guard
(finite), torchrun (parallel), the precision policy, progress lines, training curves and pictures (curves, draw),
tagging thresholds, atomic writes (safe_io), self-checking caches (caches), and the file formats of others: CLIP
checkpoints (clip_files, clip_convert, torchscript_files: OpenAI's archive read without running its code), CLIP's
BPE tokenizer, datasets (data_formats, prepared), score files."""
