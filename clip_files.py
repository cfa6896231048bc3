"""A CLIP checkpoint file on disk -> a `clip_text.CLIP` in fp32: reading, diagnosing, hashing, vocabulary.

    python clip_files.py ViT-B-16.pt "a photo of a dog."     # config, sha256 and text embedding norms

Formats read today:
  - OpenAI's release (ViT-B-16.pt): a TorchScript archive (a zip) whose state dict is partly fp16 and holds
    three int entries (input_resolution, context_length, vocab_size) beside the weights.
  - A plain torch.save state dict with OpenAI's key names (fp32, fp16 or mixed), e.g. the committed toyclip.
Each format ends as {OpenAI key: fp32 tensor}; `load_clip` infers the configuration from the shapes
(CLIPConfig.from_state_dict) and checks the keys strictly. A file that is not one of these gets ONE line
naming it and saying what it is instead (empty, truncated zip, a ResNet CLIP, not a CLIP at all, ...).
"""
import argparse
import hashlib
import os
import pickle
import sys
import warnings
import zipfile

import torch

from clip_text import CLIP, OFFICIAL_VOCAB, CLIPConfig
from vit import CheckpointError, check_keys

INT_ENTRIES = ("input_resolution", "context_length", "vocab_size")  # int scalars in OpenAI's file, not weights
# Keys the configuration is inferred from; a file without any of them is not a CLIP checkpoint at all.
STRUCTURAL = ("visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight",
              "positional_embedding", "ln_final.weight", "text_projection")


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # 1 MB at a time: a 350 MB file never sits in memory
            digest.update(block)
    return digest.hexdigest()


def _unreadable(path, err):
    """Why neither torch.jit.load nor torch.load could read `path`, in a few words."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "empty file (expected a CLIP checkpoint)"
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return "truncated zip archive (its end, with the file index, is missing); copy or download it again"
    if head != b"PK\x03\x04" and not head.startswith(b"\x80"):  # neither a zip nor a pickle
        return "not a checkpoint (expected a TorchScript archive or a torch.save state dict)"
    if isinstance(err, pickle.UnpicklingError) and str(err).startswith("Weights only load failed"):
        return "holds Python objects other than tensors (refused by torch.load weights_only=True)"
    first = (str(err).strip().splitlines() or [""])[0][:120]
    return f"not a TorchScript archive or a torch.save state dict ({type(err).__name__}: {first})"


def read_state_dict(path):
    """OpenAI's file (TorchScript archive) or a plain state dict -> {key: fp32 tensor}, int entries dropped."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found (expected a CLIP checkpoint such as ViT-B-16.pt)")
    kind = "TorchScript archive"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates torch.jit; OpenAI ships it
            # A path, not a reused handle: openai/CLIP's clip.load reuses one that jit.load has read to its end,
            # so its torch.load fallback fails (EOFError) on plain state dicts with current torch.
            # map_location: a file traced on a GPU carries cuda:0 storages.
            sd = torch.jit.load(path, map_location="cpu").state_dict()
    except RuntimeError:  # not TorchScript: a plain state dict, or garbage
        kind = "state dict"
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types here (RuntimeError, UnpicklingError, EOFError, ...)
            raise CheckpointError(f"{path}: {_unreadable(path, err)}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{path}: expected a CLIP state dict (dict of tensors), got {type(sd).__name__}")
    sd = {k: v.float() for k, v in sd.items() if k not in INT_ENTRIES}  # partly fp16 in the file
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in sd):
        raise CheckpointError(f"{path}: only ViT CLIP checkpoints are supported (this one has a ResNet visual tower)")
    missing = [k for k in STRUCTURAL if k not in sd]
    if len(missing) == len(STRUCTURAL):
        found = ", ".join(list(sd)[:3]) or "nothing"
        raise CheckpointError(f"{path}: {kind} is not a CLIP model (expected keys such as {STRUCTURAL[0]}, "
                              f"{STRUCTURAL[2]}; found {found}; {len(sd)} keys)")
    if missing:
        check_keys(sd, set(sd) | set(missing), path)  # names the missing keys, in the strict check's words
    return sd


def bpe_for(path, vocab_size, bpe=None):
    """Which BPE file the checkpoint at `path` needs; None = the official lookup (see tokenizer.find_bpe).

    A non-official vocabulary (a toy CLIP trained here) needs its own merges: `bpe`, else
    `<checkpoint stem>.bpe.txt.gz` next to the checkpoint, else $SIGRL_BPE. The sibling file wins over the
    environment variable, which usually names the official vocabulary: its first merges would tokenize a
    small-vocabulary model without any error, but wrongly.
    """
    if bpe is not None or vocab_size == OFFICIAL_VOCAB:
        return bpe
    sibling = os.path.splitext(str(path))[0] + ".bpe.txt.gz"
    if os.path.exists(sibling) or not os.environ.get("SIGRL_BPE"):
        return sibling
    return os.environ["SIGRL_BPE"]


def load_clip(path, bpe=None):
    """A CLIP checkpoint file -> CLIP in fp32, eval mode, with .source, .sha256 and a matching .tokenizer.

    Every failure is a CheckpointError whose one-line message names the file and what was expected.
    """
    path = str(path)
    sd = read_state_dict(path)
    with torch.device("meta"):  # shapes only: random init of 150M numbers would be thrown away
        model = CLIP(CLIPConfig.from_state_dict(sd))
    check_keys(sd, model.state_dict(), path)
    try:
        model.load_state_dict(sd, assign=True)  # the parameters become the loaded fp32 tensors
    except RuntimeError as err:  # shapes that disagree with the inferred configuration
        detail = " ".join(str(err).split())[:200]
        raise CheckpointError(f"{path}: tensor shapes do not fit one CLIP configuration ({detail})") from None
    model.source, model.sha256 = path, file_sha256(path)
    model.bpe = bpe_for(path, model.config.vocab_size, bpe)
    return model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Load a CLIP checkpoint; print its config and text embedding norms.")
    parser.add_argument("checkpoint")
    parser.add_argument("texts", nargs="*", help='e.g. "a photo of a dog."')
    parser.add_argument("--bpe", default=None, help="BPE vocabulary file for a non-official vocabulary")
    args = parser.parse_args(argv)
    try:
        clip = load_clip(args.checkpoint, bpe=args.bpe)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    n_params = sum(p.numel() for p in clip.parameters())
    print(f"{clip.source}  sha256 {clip.sha256[:16]}...  {n_params:,} parameters")
    print(clip.config)
    if args.texts:
        with torch.no_grad():
            emb = clip.encode_text(clip.tokenizer(args.texts))  # (N, D)
        for text, row in zip(args.texts, emb):
            print(f"|e| = {row.norm():8.4f}  {text!r}")


if __name__ == "__main__":
    main()
