"""Pre-train the toy world's tiny CLIP: contrastive image-caption learning, as OpenAI trained CLIP.

    python -m toy.pretrain --out toy/      (writes toyclip.pt, its vocabulary and toyclip.json there)

Shape legend: B batch, R resolution (64), L context length (77), l the longest caption in a batch,
W widths, D joint embedding width, V vocabulary size.

Recipe (CLIP, Radford et al. 2021, at toy scale): the pre-training split of the world (toyworld.PRETRAIN, disjoint
from the train/test images) with captions that name every label, seen and unseen; the vocabulary is a BPE
learned on those captions (tokenizer.learn_bpe); symmetric InfoNCE over the B x B cosine-similarity matrix
scaled by a learned temperature (clamped at 100, as CLIP); AdamW, linear warm-up then cosine decay; CLIP's own
image mean/std (SigRL later feeds ImageNet-normalised images to it, as the reference code does to the real CLIP).
Augmentation: a random zoom (1-1.15x) and a horizontal flip; by default each image is seen about 5 times.

The file is OpenAI's layout: a plain state dict with exactly the official keys, the fp16
subset stored in half precision, plus int64 scalars input_resolution, context_length and vocab_size; the
vocabulary sits next to it as <stem>.bpe.txt.gz, where clip_files.load_clip looks for it.
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from support import cli
from support.errors import UsageError
from toy import world as toyworld
from support.clip_files import INT_ENTRIES
from clip_text import CLIP, CLIPConfig
from support.tokenizer import N_RESERVED, Tokenizer, learn_bpe, write_bpe
from vit import VisionConfig

# OpenAI stores these in fp16 (as in its ViT-B-16.pt): conv1, every Linear and in_proj tensor, both projections.
FP16_SUFFIXES = ("conv1.weight", "attn.in_proj_weight", "attn.in_proj_bias", "out_proj.weight", "out_proj.bias",
                 "c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")
FP16_KEYS = ("visual.proj", "text_projection")


@dataclass
class PretrainConfig:
    seed: int = 0
    n_images: int = 20000        # pre-training images, drawn once and kept in memory (uint8, 250 MB)
    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.1    # on matrices only (not on embeddings, norms, biases, temperature)
    vision_width: int = 128      # heads = width // 64, as OpenAI's build_model infers them
    vision_layers: int = 4
    patch: int = 8               # 64 px / 8 = 8 x 8 = 64 patch tokens (ViT-B/16 at 224 px has 14 x 14)
    text_width: int = 128
    text_layers: int = 3
    embed_dim: int = 128
    context_length: int = 77     # as OpenAI's; training only runs the positions up to the longest caption
    threads: int = 2


def build_clip(cfg, vocab_size):
    vision = VisionConfig(width=cfg.vision_width, layers=cfg.vision_layers, patch=cfg.patch,
                          resolution=toyworld.RES, embed_dim=cfg.embed_dim)
    return CLIP(CLIPConfig(vision=vision, embed_dim=cfg.embed_dim, context_length=cfg.context_length,
                           vocab_size=vocab_size, text_width=cfg.text_width, text_layers=cfg.text_layers))


def encode_text_prefix(clip, tokens):
    """clip.encode_text on ids (N, L), computing only positions 0..l-1, l = 1 + the last EOT position.

    Exact, not an approximation: under the causal mask a position never attends to later ones, so the EOT row
    (the only one pooled) is the same with or without the padding after it; the padding is most of the cost.
    """
    eot = tokens.argmax(dim=-1)                                                      # (N,)
    l = int(eot.max()) + 1
    x = clip.token_embedding(tokens[:, :l]) + clip.positional_embedding[:l]          # (N, l, Wt)
    mask = torch.full((l, l), float("-inf")).triu(1)                                 # (l, l) causal
    x = clip.transformer(x, mask)                                                    # (N, l, Wt)
    return clip.ln_final(x[torch.arange(len(x)), eot]) @ clip.text_projection         # (N, Wt) @ (Wt, D)


def augment(x, gen):
    """A random zoom of the whole batch (1-1.15x, random crop back to R) and a per-image horizontal flip."""
    R = x.shape[-1]
    side = R + int(torch.randint(0, R * 15 // 100 + 1, (), generator=gen))
    x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    i, j = torch.randint(0, side - R + 1, (2,), generator=gen).tolist()
    x = x[:, :, i:i + R, j:j + R]                                                    # (B, 3, R, R)
    flip = torch.rand(len(x), generator=gen) < 0.5                                   # (B,)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def contrastive_loss(image_emb, text_emb, logit_scale):
    """Symmetric InfoNCE: matched pairs lie on the diagonal of the (B, B) similarity matrix."""
    logits = logit_scale.exp() * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T  # (B, B)
    target = torch.arange(len(logits))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def save_official(clip, path):
    """OpenAI's layout: official keys, fp16 subset in half precision, the three int64 scalars; atomic."""
    sd = {k: v.half() if k.endswith(FP16_SUFFIXES) or k in FP16_KEYS else v.clone()
          for k, v in clip.state_dict().items()}
    c = clip.config
    sd.update({k: torch.tensor(v) for k, v in zip(INT_ENTRIES, (c.vision.resolution, c.context_length,
                                                                c.vocab_size))})
    torch.save(sd, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


def pretrain(out_dir, cfg=PretrainConfig()):
    """Train and write <out_dir>/toyclip.pt, toyclip.bpe.txt.gz and toyclip.json (config, time, zero-shot)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    draws = [toyworld.draw_example(cfg.seed, toyworld.PRETRAIN, i)
             for i in tqdm(range(cfg.n_images), desc="drawing", leave=False, disable=None)]
    images = torch.from_numpy(np.stack([np.asarray(d[0]) for d in draws]))          # uint8 (N, R, R, 3)
    captions = [d[3] for d in draws]
    bpe = os.path.join(out_dir, "toyclip.bpe.txt.gz")
    merges = learn_bpe(captions, n_merges=10_000)              # stops once every caption word is one token
    write_bpe(bpe, merges)
    tokenizer = Tokenizer(bpe, vocab_size=N_RESERVED + len(merges))
    tokens = tokenizer(captions, context_length=cfg.context_length)                  # (N, L)

    clip = build_clip(cfg, tokenizer.vocab_size).train()
    matrices = [p for n, p in clip.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    others = [p for n, p in clip.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": cfg.weight_decay},
                             {"params": others, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.steps), desc="pretrain", dynamic_ncols=True, disable=None)
    for step in bar:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, cfg.n_images, (cfg.batch_size,), generator=gen)     # (B,)
        loss = contrastive_loss(clip.encode_image(augment(toyworld.to_clip_input(images[idx]), gen)),
                                encode_text_prefix(clip, tokens[idx]), clip.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))       # CLIP caps the temperature at 100
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
    minutes = (time.time() - start) / 60

    path = os.path.join(out_dir, "toyclip.pt")
    save_official(clip.eval(), path)
    results = toyworld.zeroshot(path)
    with open(os.path.join(out_dir, "toyclip.json"), "w") as f:
        changed = [f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items() if v != getattr(PretrainConfig, k)]
        json.dump({"command": " ".join(["python -m toy.pretrain --out", out_dir] + changed), "config": asdict(cfg),
                   "minutes": round(minutes, 1), "torch": torch.__version__, "zeroshot": results}, f, indent=2)
    return path


@cli.command
def main(argv=None):
    from dataclasses import fields
    from support.paths import FOLDER, check_outputs
    p = cli.parser(prog="python -m toy.pretrain", description="Pre-train the toy world's tiny CLIP (contrastive, as OpenAI's CLIP) "
                                    "and write toyclip.pt, toyclip.bpe.txt.gz and toyclip.json into --out.")
    p.add_argument("--out", default=os.path.dirname(toyworld.TOYCLIP), help="folder (default: toy/, the committed one)")
    for f in fields(PretrainConfig):  # every integer >= 1 but the seed; the rates finite and >= 0
        kind = type(f.default) if f.type in (float, "float") else cli.at_least(0 if f.name == "seed" else 1)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, help="(default: %(default)s)")
    args = p.parse_args(argv)
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    if not (0 <= cfg.lr < float("inf") and 0 <= cfg.weight_decay < float("inf")):
        raise UsageError("--lr and --weight-decay: expected finite numbers >= 0")
    if cfg.vision_width % 64 or cfg.text_width % 64 or 64 % cfg.patch:
        raise UsageError("--vision-width and --text-width must be multiples of 64 (heads = width // 64), "
                         "--patch a divisor of the 64 px images")
    check_outputs([("--out", args.out, FOLDER)] + [("--out", os.path.join(args.out, name)) for name in
                                                  ("toyclip.pt", "toyclip.bpe.txt.gz", "toyclip.json")])
    print(pretrain(args.out, cfg))


if __name__ == "__main__":
    sys.exit(main())
