"""The offline world `python train.py` runs on: a synthetic multi-label world with seen and unseen labels
(world), how its pictures are drawn (shapes), and its tiny CLIP (toyclip.pt, with its BPE vocabulary) with the
contrastive pre-training that made it (pretrain)."""
