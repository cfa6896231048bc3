"""Other projects' CLIP checkpoints -> OpenAI's key names, so one `CLIP` module reads them all.

Shape legend: W vision width (768), Wt text width (512), D joint embedding width (512).

Two layouts besides OpenAI's own:
  - Hugging Face transformers' `CLIPModel` (e.g. the hub's openai/clip-vit-base-patch16): the same
    network under other names (`RENAMES` below), with three differences in how tensors are stored:
    separate q/k/v projections (OpenAI stacks them into one in_proj, rows q then k then v), projections
    kept as nn.Linear weights (D, W) where OpenAI keeps the matrix it right-multiplies by, (W, D), and
    index buffers (`position_ids`) that older transformers versions saved with the weights. The
    activation and head counts are not in the tensors: they come from the folder's config.json.
  - open_clip: OpenAI's key names already. Its training checkpoints wrap them ({"epoch", "state_dict",
    "optimizer", ...}, keys prefixed "module." under DistributedDataParallel, "_orig_mod." after
    torch.compile). Its models use exact GELU unless the config says quick_gelu (LAION's ViT-B-16 uses
    GELU, OpenAI's QuickGELU), so the activation comes from the model's open_clip_config.json.
Each function returns {OpenAI key: fp32 tensor} and `Arch`, the part of the architecture that the
tensor shapes cannot tell (CLIPConfig.from_state_dict infers the rest).
"""
from dataclasses import dataclass
import re

import torch

from vit import check_keys
from support.errors import CheckpointError


@dataclass
class Arch:
    """What a state dict's shapes do not say. OpenAI's rules: QuickGELU, heads = width // 64."""
    quick_gelu: bool = True
    vision_heads: int | None = None  # None -> width // 64
    text_heads: int | None = None


# ------------------------------------------------------------------------------ transformers' CLIPModel
# transformers name -> OpenAI name; "{t}" is weight or bias.
RENAMES = {
    "logit_scale": "logit_scale",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.{t}": "ln_final.{t}",
    "text_projection.weight": "text_projection",  # transposed
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.{t}": "visual.ln_pre.{t}",  # sic: transformers spells it "layrnorm"
    "vision_model.post_layernorm.{t}": "visual.ln_post.{t}",
    "visual_projection.weight": "visual.proj",  # transposed
}
# inside "<tower>.encoder.layers.{i}." -> "<prefix>transformer.resblocks.{i}."
BLOCK_RENAMES = {
    "layer_norm1.{t}": "ln_1.{t}",
    "self_attn.out_proj.{t}": "attn.out_proj.{t}",
    "layer_norm2.{t}": "ln_2.{t}",
    "mlp.fc1.{t}": "mlp.c_fc.{t}",
    "mlp.fc2.{t}": "mlp.c_proj.{t}",
}
QKV = ("self_attn.q_proj.{t}", "self_attn.k_proj.{t}", "self_attn.v_proj.{t}")  # -> attn.in_proj_{t}, stacked
TOWERS = {"text_model": "", "vision_model": "visual."}  # transformers prefix -> OpenAI prefix
TRANSPOSED = ("text_projection", "visual.proj")
IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")  # arange buffers
# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for a config.json that leaves a field out
TEXT_DEFAULTS = {"hidden_act": "quick_gelu", "num_attention_heads": 8, "layer_norm_eps": 1e-5}
VISION_DEFAULTS = {"hidden_act": "quick_gelu", "num_attention_heads": 12, "layer_norm_eps": 1e-5}
ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # transformers' name -> quick_gelu (its "gelu" is exact)


def _layers(sd, tower):
    return sorted({int(m.group(1)) for k in sd if (m := re.match(rf"{tower}\.encoder\.layers\.(\d+)\.", k))})


def from_transformers(sd, config, source):
    """A transformers CLIPModel state dict and its config.json (a dict) -> (OpenAI state dict, Arch)."""
    if config.get("model_type") not in (None, "clip"):
        raise CheckpointError(f"{source}: config.json describes a {config['model_type']!r} model, not CLIP")
    sd = {k: v for k, v in sd.items() if k not in IGNORED}
    renames = {}  # every expected transformers name -> its OpenAI name; q/k/v map to (OpenAI name, row block)
    for hf, ours in RENAMES.items():
        for t in ("weight", "bias") if "{t}" in hf else ("",):
            renames[hf.format(t=t)] = ours.format(t=t)
    for tower, prefix in TOWERS.items():
        for i in _layers(sd, tower):
            block, resblock = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for t in ("weight", "bias"):
                for hf, ours in BLOCK_RENAMES.items():
                    renames[block + hf.format(t=t)] = resblock + ours.format(t=t)
                for row_block, hf in enumerate(QKV):
                    renames[block + hf.format(t=t)] = (resblock + f"attn.in_proj_{t}", row_block)
    check_keys(sd, renames, source)  # one line naming missing / unexpected keys

    out, qkv = {}, {}
    for hf, ours in renames.items():
        tensor = sd[hf].float()
        if isinstance(ours, tuple):
            qkv.setdefault(ours[0], [None] * 3)[ours[1]] = tensor  # (W, W) or (W,) each
        else:
            out[ours] = tensor.T.contiguous() if ours in TRANSPOSED else tensor  # (D, W) -> (W, D)
    for name, (q, k, v) in qkv.items():
        out[name] = torch.cat([q, k, v])  # (3W, W) or (3W,), rows q then k then v as nn.MultiheadAttention
    out["logit_scale"] = out["logit_scale"].reshape(())
    n_blocks = sum(len(_layers(sd, tower)) for tower in TOWERS)
    assert len(out) == len(sd) - 4 * n_blocks, "each block's 6 q/k/v tensors become 2; nothing else merges"
    return out, _transformers_arch(out, config, source)


def _transformers_arch(out, config, source):
    text = TEXT_DEFAULTS | (config.get("text_config") or config.get("text_config_dict") or {})
    vision = VISION_DEFAULTS | (config.get("vision_config") or config.get("vision_config_dict") or {})
    acts = {text["hidden_act"], vision["hidden_act"]}
    if len(acts) > 1 or not acts <= ACTIVATIONS.keys():
        raise CheckpointError(f"{source}: config.json's activations {sorted(acts)} are not supported (one of "
                              f"{', '.join(ACTIVATIONS)}, the same in both towers)")
    if {text["layer_norm_eps"], vision["layer_norm_eps"]} != {1e-5}:
        raise CheckpointError(f"{source}: config.json's layer_norm_eps must be 1e-5, as CLIP's")
    # The sizes the shapes give must agree with the ones config.json states (where it states them).
    found = {("vision_config", "hidden_size"): out["visual.conv1.weight"].shape[0],
             ("vision_config", "patch_size"): out["visual.conv1.weight"].shape[-1],
             ("vision_config", "intermediate_size"): 4 * out["visual.conv1.weight"].shape[0],
             ("text_config", "hidden_size"): out["ln_final.weight"].shape[0],
             ("text_config", "intermediate_size"): 4 * out["ln_final.weight"].shape[0],
             ("text_config", "vocab_size"): out["token_embedding.weight"].shape[0],
             ("text_config", "max_position_embeddings"): out["positional_embedding"].shape[0],
             (None, "projection_dim"): out["text_projection"].shape[1]}
    for (part, key), value in found.items():
        stated = (config.get(part) or {}).get(key) if part else config.get(key)
        if stated is not None and stated != value:
            raise CheckpointError(f"{source}: config.json's {part + '.' if part else ''}{key} is {stated}, "
                                  f"but the weights give {value}")
    return Arch(quick_gelu=ACTIVATIONS[text["hidden_act"]], vision_heads=vision["num_attention_heads"],
                text_heads=text["num_attention_heads"])


# ------------------------------------------------------------------------------------------ open_clip
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
# model_cfg fields with the values OpenAI's architecture allows (ANY: any value, e.g. sizes, which the tensors
# give). Other fields, or other values (another pooling, a timm or Hugging Face tower, ...), are refused.
ANY = "any value"
MODEL_FIELDS = {"embed_dim": ANY, "quick_gelu": ANY, "vision_cfg": ANY, "text_cfg": ANY, "custom_text": False,
                "cast_dtype": ANY}  # cast_dtype: training precision only
VISION_FIELDS = {"image_size": ANY, "layers": ANY, "width": ANY, "patch_size": ANY, "head_width": 64,
                 "mlp_ratio": 4.0, "patch_dropout": ANY, "ls_init_value": None, "attentional_pool": False,
                 "no_ln_pre": False, "pool_type": "tok", "final_ln_after_pool": False, "output_tokens": False,
                 "timm_model_name": None}  # patch dropout acts in training only
TEXT_FIELDS = {"context_length": ANY, "vocab_size": ANY, "width": ANY, "heads": ANY, "layers": ANY,
               "mlp_ratio": 4.0, "ls_init_value": None, "pool_type": "argmax", "proj_bias": False,
               "no_causal_mask": False, "embed_cls": False, "pad_id": 0, "output_tokens": False,
               "hf_model_name": None, "hf_tokenizer_name": None}


def unwrap_open_clip(obj):
    """open_clip's training checkpoint {"state_dict": ...} (or a bare state dict) -> the bare state dict,
    without the DistributedDataParallel / torch.compile prefixes; logit_scale as a 0-d tensor."""
    sd = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    for prefix in WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if "logit_scale" in sd:
        sd = {**sd, "logit_scale": sd["logit_scale"].reshape(())}  # older open_clip saved it as (1,)
    return sd


def open_clip_arch(model_cfg, source):
    """Arch from open_clip's model config (open_clip_config.json's "model_cfg", or a model_configs/*.json).

    Only OpenAI's ViT architecture is read; a field that would change the computation without changing
    the tensors' names or shapes (another pooling, a timm or Hugging Face tower, ...) is refused by name.
    """
    for where, cfg, fields in ((None, model_cfg, MODEL_FIELDS), ("vision_cfg", model_cfg.get("vision_cfg", {}),
                                                                 VISION_FIELDS),
                               ("text_cfg", model_cfg.get("text_cfg", {}), TEXT_FIELDS)):
        for key, value in cfg.items():
            if key not in fields or fields[key] is not ANY and value != fields[key]:
                raise CheckpointError(f"{source}: model_cfg {where + '.' if where else ''}{key} = {value!r} is not "
                                      f"supported (only OpenAI's CLIP ViT architecture is read)")
    return Arch(quick_gelu=bool(model_cfg.get("quick_gelu", False)),  # open_clip's default is exact GELU
                text_heads=model_cfg.get("text_cfg", {}).get("heads", 8))  # open_clip CLIPTextCfg default


if __name__ == "__main__":
    print("transformers' CLIPModel -> OpenAI's names (block names repeat for every layer i of each tower):")
    for hf, ours in RENAMES.items():
        print(f"  {hf:52} -> {ours}{'  (transposed)' if ours in TRANSPOSED else ''}")
    for hf, ours in BLOCK_RENAMES.items():
        print(f"  <text_model|vision_model>.encoder.layers.i.{hf:24} -> <''|visual.>transformer.resblocks.i.{ours}")
    print(f"  {' + '.join(q.split('.')[1] for q in QKV):52} -> attn.in_proj_{{t}}, stacked (rows q, k, v)")
    print(f"  dropped: {', '.join(IGNORED)}")
