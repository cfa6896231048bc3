"""A CLIP checkpoint on disk -> a `clip_text.CLIP` in fp32: finding the weights, reading, diagnosing, hashing.

    python -m support.clip_files ViT-B-16.pt "a photo of a dog."     # config, sha256 and text embedding norms

What `load_clip(path)` reads (renaming other layouts to OpenAI's keys is clip_convert.py's job):
  - OpenAI's release, ViT-B-16.pt (`OFFICIAL_URL`): a TorchScript archive (a zip) whose state dict is partly
    fp16 and holds three int entries (input_resolution, context_length, vocab_size) beside the weights.
  - A plain torch.save state dict with OpenAI's key names (fp32, fp16 or mixed), e.g. the committed toyclip.
    It is read as OpenAI's architecture (QuickGELU), as openai/CLIP's build_model reads any state dict,
    unless an open_clip_config.json beside it says otherwise.
  - A transformers CLIPModel folder (config.json + model.safetensors or pytorch_model.bin; the hub's
    openai/clip-vit-base-patch16), or either weights file in it.
  - open_clip: its hub folder (open_clip_config.json + open_clip_model.safetensors or
    open_clip_pytorch_model.bin; e.g. LAION's laion/CLIP-ViT-B-16-laion2B-s34B-b88K, GELU), or a training
    checkpoint (epoch_N.pt) with the model's open_clip_config.json beside it.
Each ends as {OpenAI key: fp32 tensor} plus what shapes cannot tell (activation, head counts); `load_clip`
infers the rest of the configuration from the shapes and checks the keys strictly. A path that is none of
these gets ONE line naming it and saying what it is instead (empty, truncated zip, a ResNet CLIP, ...).
"""
import hashlib
import json
import os
import pickle
import sys
import zipfile

import torch

from support import cli
from support.progress import working
from support.clip_convert import Arch, from_transformers, open_clip_arch, unwrap_open_clip
from clip_text import CLIP, OFFICIAL_VOCAB, CLIPConfig
from support.tokenizer import find_bpe
from support.torchscript_files import is_torchscript, read_archive
from vit import check_keys
from support.errors import CheckpointError

# openai/CLIP's model list (clip/clip.py, _MODELS["ViT-B/16"]); the path holds the file's sha256.
OFFICIAL_SHA256 = "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"
OFFICIAL_URL = f"https://openaipublic.azureedge.net/clip/models/{OFFICIAL_SHA256}/ViT-B-16.pt"
WHERE = (f"OpenAI's ViT-B-16.pt, {OFFICIAL_URL} (sha256 {OFFICIAL_SHA256}), a transformers CLIPModel folder "
         f"such as the Hugging Face hub's openai/clip-vit-base-patch16, or an open_clip checkpoint")
# folder layouts: (config file, weights files in order of preference)
OPEN_CLIP_FOLDER = ("open_clip_config.json", ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
TRANSFORMERS_FOLDER = ("config.json", ("model.safetensors", "pytorch_model.bin"))
INT_ENTRIES = ("input_resolution", "context_length", "vocab_size")  # int scalars in OpenAI's file, not weights
# Keys the configuration is inferred from; a file without any of them is not a CLIP checkpoint at all.
STRUCTURAL = ("visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight",
              "positional_embedding", "ln_final.weight", "text_projection")
# A state dict does not record its depth: the config is inferred from the blocks present, so a file that lost its
# last block would load as a shallower model. Every released CLIP ViT has the depth of its width: OpenAI's
# ViT-B/32 and B/16 (image 768 x 12, text 512 x 12), ViT-L/14 (image 1024 x 24, text 768 x 12), open_clip's
# ViT-H/14 (image 1280 x 32, text 1024 x 24). Other widths are checked for gaps and complete blocks only.
TOWERS = {"image": ("visual.transformer.resblocks.", "visual.conv1.weight", {768: 12, 1024: 24, 1280: 32}),
          "text": ("transformer.resblocks.", "ln_final.weight", {512: 12, 768: 12, 1024: 24})}


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # 1 MB at a time: a 350 MB file never sits in memory
            digest.update(block)
    return digest.hexdigest()


def _unreadable(path, err):
    """Why torch.load could not read `path` (not a TorchScript archive), in a few words."""
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


def find_weights(path):
    """The weights file `path` names: the file itself, or the open_clip / transformers weights in a folder."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: file not found (expected a CLIP checkpoint: {WHERE})")
    for config, weights in (OPEN_CLIP_FOLDER, TRANSFORMERS_FOLDER):
        found = [w for w in weights if os.path.isfile(os.path.join(path, w))]
        if os.path.isfile(os.path.join(path, config)) and found:
            return os.path.join(path, found[0])
    raise CheckpointError(f"{path}: a folder, but neither a transformers CLIPModel folder ({TRANSFORMERS_FOLDER[0]} "
                          f"with {' or '.join(TRANSFORMERS_FOLDER[1])}) nor an open_clip one ({OPEN_CLIP_FOLDER[0]} "
                          f"with {' or '.join(OPEN_CLIP_FOLDER[1])})")


def read_file(path):
    """(what the file holds, its kind): a .safetensors file, a TorchScript archive or a torch.save file."""
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file  # optional: only these files need it
        except ImportError:
            raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package (pip install "
                                  f"safetensors), or give the .bin weights file instead") from None
        try:
            return load_file(path), "safetensors file"
        except Exception as err:  # its own SafetensorError, OSError, ...
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(err).__name__}: "
                                  f"{str(err)[:100]})") from None
    if is_torchscript(path):
        # OpenAI's release. Its tensors are unpickled without torch.jit.load, which would compile the archive's
        # code and run it (a class's __setstate__ runs while loading), so a crafted file could do anything.
        return read_archive(path), "TorchScript archive"
    try:
        return torch.load(path, map_location="cpu", weights_only=True), "state dict"
    except Exception as err:  # torch raises many types here (RuntimeError, UnpicklingError, EOFError, ...)
        raise CheckpointError(f"{path}: {_unreadable(path, err)}") from None


def _json(path, weights, why):
    if not os.path.isfile(path):
        raise CheckpointError(f"{weights}: {why}, but there is no {os.path.basename(path)} beside it")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: nested too deep
        raise CheckpointError(f"{path}: not a readable JSON file ({err})") from None


def read_state_dict(path):
    """Any supported checkpoint -> ({OpenAI key: fp32 tensor}, Arch, the weights file it came from)."""
    weights = find_weights(str(path))
    obj, kind = read_file(weights)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{weights}: expected a CLIP state dict (dict of tensors), got {type(obj).__name__}")
    folder = os.path.dirname(weights)
    if kind == "TorchScript archive":
        sd, arch = obj, Arch()  # OpenAI's release: QuickGELU, heads = width // 64
    elif any(k.startswith(("text_model.", "vision_model.")) for k in obj):
        config = _json(os.path.join(folder, TRANSFORMERS_FOLDER[0]), weights,
                       "transformers' layout, whose activation and head counts are in config.json")
        sd, arch = from_transformers(obj, config, weights)
    else:
        sd, config = unwrap_open_clip(obj), os.path.join(folder, OPEN_CLIP_FOLDER[0])
        if os.path.isfile(config):
            arch = open_clip_arch(_json(config, weights, "").get("model_cfg", {}), config)
        elif isinstance(obj.get("state_dict"), dict):
            raise CheckpointError(f"{weights}: an open_clip training checkpoint records no activation (GELU or "
                                  f"QuickGELU); put the model's {OPEN_CLIP_FOLDER[0]} beside it "
                                  f"({{\"model_cfg\": open_clip's model_configs/<model>.json}})")
        else:
            arch = Arch()  # OpenAI's names: read as OpenAI's architecture, as openai/CLIP's build_model does
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{weights}: expected a CLIP state dict (dict of tensors), got other values too")
    sd = {k: v.float() for k, v in sd.items() if k not in INT_ENTRIES}  # partly fp16 in OpenAI's file
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in sd):
        raise CheckpointError(f"{weights}: only ViT CLIP checkpoints are supported (this one has a ResNet visual tower)")
    missing = [k for k in STRUCTURAL if k not in sd]
    if len(missing) == len(STRUCTURAL):
        found = ", ".join(list(sd)[:3]) or "nothing"
        raise CheckpointError(f"{weights}: {kind} is not a CLIP model (expected keys such as {STRUCTURAL[0]}, "
                              f"{STRUCTURAL[2]}; found {found}; {len(sd)} keys)")
    if missing:
        check_keys(sd, set(sd) | set(missing), weights)  # names the missing keys, in the strict check's words
    check_blocks(sd, weights)
    damaged = [k for k, v in sd.items() if not torch.isfinite(v).all()]
    if damaged:
        raise CheckpointError(f"{weights}: {len(damaged)} tensor(s) hold NaN or infinite values (first: {damaged[0]}); "
                              f"the file is damaged: copy or download it again")
    return sd, arch, weights


def check_blocks(sd, path):
    """Each tower's blocks are numbered 0..L-1 without a gap, each holds the same keys, and a tower of a released
    width has that width's depth (TOWERS)."""
    for tower, (prefix, width_key, depths) in TOWERS.items():
        blocks = {}
        for k in sd:
            if k.startswith(prefix):
                index, rest = k[len(prefix):].split(".", 1)
                blocks.setdefault(int(index), set()).add(rest)
        if not blocks:
            continue
        gaps = sorted(set(range(max(blocks) + 1)) - set(blocks))
        if gaps:
            raise CheckpointError(f"{path}: {tower} tower block(s) {', '.join(map(str, gaps))} missing (the file "
                                  f"has blocks {', '.join(map(str, sorted(blocks)))})")
        every = set().union(*blocks.values())
        for i, keys in sorted(blocks.items()):
            if keys != every:
                raise CheckpointError(f"{path}: {tower} tower block {i} is missing {', '.join(sorted(every - keys))}")
        width, depth = sd[width_key].shape[0], len(blocks)
        if depths.get(width, depth) != depth:
            raise CheckpointError(f"{path}: {tower} tower of width {width} has {depth} blocks, but every released "
                                  f"CLIP of that width has {depths[width]} (blocks lost in a copy or an edit?)")


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
    """A CLIP checkpoint (file or folder) -> CLIP in fp32, eval mode, with .source, .sha256 (of the weights
    file) and a matching .tokenizer.

    Every failure is a CheckpointError whose one-line message names the file and what was expected.
    """
    path = str(path)
    if not path:
        raise CheckpointError(f"no CLIP checkpoint given (--clip PATH); expected {WHERE}")
    with working(f"loading the CLIP file {path}"):  # 600 MB for ViT-B/16: a minute on a slow disk
        sd, arch, weights = read_state_dict(path)
    config = CLIPConfig.from_state_dict(sd, arch.quick_gelu, arch.vision_heads, arch.text_heads)
    with torch.device("meta"):  # shapes only: random init of 150M numbers would be thrown away
        model = CLIP(config)
    check_keys(sd, model.state_dict(), weights)
    try:
        model.load_state_dict(sd, assign=True)  # the parameters become the loaded fp32 tensors
    except RuntimeError as err:  # shapes that disagree with the inferred configuration
        detail = " ".join(str(err).split())[:200]
        raise CheckpointError(f"{weights}: tensor shapes do not fit one CLIP configuration ({detail})") from None
    model.source, model.sha256 = path, file_sha256(weights)
    model.bpe = bpe_for(weights, model.config.vocab_size, bpe)
    try:
        find_bpe(model.bpe)  # a missing vocabulary fails here, in one line, not at the first tokenization
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return model.eval()


@cli.command
def main(argv=None):
    parser = cli.parser(prog="python -m support.clip_files", description="Load a CLIP checkpoint; print its config and text embedding norms.")
    parser.add_argument("checkpoint")
    parser.add_argument("texts", nargs="*", help='e.g. "a photo of a dog."')
    parser.add_argument("--bpe", default=None, help="BPE vocabulary file for a non-official vocabulary")
    args = parser.parse_args(argv)
    clip = load_clip(args.checkpoint, bpe=args.bpe)
    n_params = sum(p.numel() for p in clip.parameters())
    print(f"{clip.source}  sha256 {clip.sha256[:16]}...  {n_params:,} parameters")
    print(clip.config)
    if args.texts:
        with torch.no_grad():
            emb = clip.encode_text(clip.tokenizer(args.texts))  # (N, D)
        for text, row in zip(args.texts, emb):
            print(f"|e| = {row.norm():8.4f}  {text!r}")


if __name__ == "__main__":
    sys.exit(main())
