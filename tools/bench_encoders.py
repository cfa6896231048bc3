"""bench.py's encoder and tagging sections: our CLIP towers against open_clip's on the same weights, and tagging
image files end to end (predict.py's loop against open_clip's zero-shot recipe). Both need open_clip, from
requirements-dev.txt; bench.py skips them, and says so, without it.

    python -m tools.bench --only encoders predict
"""
import os
import tempfile

import torch
from PIL import Image

from clip_text import encode_labels
from data import ImageList, build_transform
from sigrl import SigRL
from support import precision
from tools.measure import DTYPES, compare, ratio as _ratio


# ---- encoders: ours vs open_clip on the same weights --------------------------------------------------------
def build_encoders(size="full"):
    """(open_clip's CLIP, ours) with the same weights: open_clip's own initialisation, copied by key."""
    from open_clip.model import CLIP as OpenCLIP, CLIPTextCfg, CLIPVisionCfg
    from clip_text import CLIP, CLIPConfig
    # (embed_dim, vision width / layers / patch / resolution, text width / heads / layers): ViT-B/16, or tiny
    embed_dim, (width, layers, patch, res), (t_width, t_heads, t_layers) = \
        {"full": (512, (768, 12, 16, 224), (512, 8, 12)), "tiny": (64, (128, 2, 16, 32), (128, 2, 2))}[size]
    torch.manual_seed(0)
    theirs = OpenCLIP(embed_dim, CLIPVisionCfg(width=width, layers=layers, patch_size=patch, image_size=res),
                      CLIPTextCfg(context_length=77, vocab_size=49408, width=t_width, heads=t_heads, layers=t_layers),
                      quick_gelu=True).eval()
    ours = CLIP(CLIPConfig.from_state_dict(theirs.state_dict()))
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours.eval()


def bench_encoders(preset, device, dtypes, progress, compile=False):
    """Ours vs open_clip, eager both (`compile` does not apply here)."""
    theirs, ours = (m.to(device) for m in build_encoders())
    V, gen = theirs.vocab_size, torch.Generator().manual_seed(0)
    tokens = torch.zeros(preset.text_batch, theirs.context_length, dtype=torch.long)  # (N, L): SOT, 8 words, EOT, pad
    tokens[:, 0], tokens[:, 9], tokens[:, 1:9] = V - 2, V - 1, torch.randint(1, V - 2, (len(tokens), 8), generator=gen)
    x, tokens = torch.randn(preset.image_batch, 3, 224, 224, generator=gen).to(device), tokens.to(device)
    rows = []
    for tower, inputs, mine, other in [("image", x, ours.encode_image, theirs.encode_image),
                                       ("text", tokens, ours.encode_text, theirs.encode_text)]:
        progress(f"{tower} encoder, batch {len(inputs)}")

        def fn(encode, inputs=inputs):
            with torch.no_grad(), precision.autocast(device, DTYPES[dtypes[0]]):
                encode(inputs)
        res = compare({"ours": lambda: fn(mine), "open_clip": lambda: fn(other)}, preset.repeats, device, 1)
        rows.append({"encoder": tower, "batch": len(inputs), "ours items/s": len(inputs) / res["ours"]["seconds"],
                     "open_clip items/s": len(inputs) / res["open_clip"]["seconds"],
                     "time ours/open_clip": _ratio(res["ours"], res["open_clip"], "seconds"), "raw": res})
    return rows


# ---- tagging image files: predict.py vs open_clip's zero-shot recipe, same files and weights -----------------
def predict_fns(paths, device, dtype, C=81, size="full", batch=16):
    """{name: fn() -> (N, C) scores}, the files at `paths` tagged with C labels three ways: open_clip's zero-shot
    recipe (its preprocess, encode_image, cosine with the prompts' text features), predict.py --clip
    (eval.clip_zero_shot through eval.predict, predict.py's loop) and predict.py --ckpt (SigRL over the C labels,
    its heads at initial weights). Label embeddings are made once per list (predict.py caches them), untimed."""
    import eval as evaluation
    from open_clip.transform import image_transform
    theirs, ours = (m.to(device) for m in build_encoders(size))
    names, R = [f"thing number {i}" for i in range(C)], ours.resolution
    zero_shot = evaluation.clip_zero_shot(ours, names, "There is a {} in the scene", device)  # transform, encode, score
    sigrl, H = SigRL.from_clip(ours).to(device).eval(), encode_labels(ours, names).to(device)  # H (C, D)
    encode, scorers = evaluation.sigrl_scorers(sigrl, {"all": H}, R, spml=False)
    with torch.no_grad():
        text = theirs.encode_text(ours.tokenizer([f"There is a {n} in the scene" for n in names]).to(device))
    text = text / text.norm(dim=-1, keepdim=True)  # (C, D)

    def open_clip_tagging():
        loader = torch.utils.data.DataLoader(ImageList(paths, [0] * len(paths), image_transform(R, False)), batch)
        with torch.no_grad(), precision.autocast(device, DTYPES[dtype]):
            image = torch.cat([theirs.encode_image(x.to(device)).float() for x, _, _ in loader])  # (N, D)
        return (image / image.norm(dim=-1, keepdim=True) @ text.T).cpu().numpy()  # (N, C)

    def ours_tagging(transform, encode, score):
        return lambda: evaluation.predict(paths, transform, encode, {"all": score}, device, batch, 0, "")["all"]
    return {"open_clip zero-shot": open_clip_tagging, "ours zero-shot (--clip)": ours_tagging(*zero_shot),
            "ours SigRL (--ckpt)": ours_tagging(build_transform("zsl", False, R), encode, scorers["all"])}


def bench_predict(preset, device, dtypes, progress, compile=False):
    """Images per second of tagging photo-sized (320 x 240) JPEGs, reading and decoding included."""
    gen, n = torch.Generator().manual_seed(0), preset.predict_images
    with tempfile.TemporaryDirectory() as folder:
        paths = [os.path.join(folder, f"{i:03d}.jpg") for i in range(n)]
        for path in paths:
            Image.fromarray(torch.randint(0, 256, (240, 320, 3), generator=gen, dtype=torch.uint8).numpy()).save(path)
        progress(f"tagging {n} images with 81 labels, three ways")
        res = compare(predict_fns(paths, device, dtypes[0]), preset.repeats, device, warmup=1)
    return [{"tagger (C = 81)": name, "images": n, "images/s": n / r["seconds"],
             "time / open_clip": _ratio(r, res["open_clip zero-shot"], "seconds"), "raw": r} for name, r in res.items()]


if __name__ == "__main__":  # imported by other commands; alone it says which
    import sys
    from support import cli
    sys.exit(cli.describe(__spec__.name if __spec__ else __file__, __doc__))
