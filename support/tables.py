"""The Markdown tables and epoch lines every command prints: one row per setting (ZSL, its twin and novel groups,
GZSL; SPML's test), figures in percent, ready to paste into a paper draft."""
import os

from protocol import zsl_groups

NUS_COLUMNS = ["map", "p@3", "r@3", "f1@3", "p@5", "r@5", "f1@5"]
SPML_COLUMNS = ["map", "p@1", "r@1", "p@3", "r@3", "f1@3", "p@5", "r@5", "f1@5"]


BRANCHES = ("local", "global")


def splits_of(results):
    """The evaluation splits of a result dict, in order (its other keys, such as branch_map, are not splits)."""
    return [k for k, v in results.items() if isinstance(v, dict) and "map" in v]


def format_table(results, title=""):
    """A Markdown table that pastes into a paper draft: one row per setting, figures in percent."""
    splits = splits_of(results)
    columns = SPML_COLUMNS if "p@1" in results[splits[0]] else NUS_COLUMNS
    head = "| setting | " + " | ".join(c.replace("map", "mAP").replace("p@", "P@").replace("r@", "R@")
                                       .replace("f1@", "F1@") for c in columns) + " |"
    lines = [title] if title else []
    lines += [head, "|" + "---|" * (len(columns) + 1)]
    for name in splits:
        lines.append(f"| {zsl_groups.setting_name(name)} | "
                     + " | ".join(f"{results[name][c]:.2f}" for c in columns) + " |")
    return "\n".join(lines)


def _aligned(rows):
    """Markdown rows (lists of cells) with every column padded to its widest cell, so the table reads in a terminal."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def format_comparison(rows, title="", spread=None):
    """Methods side by side, as two tables that fit a 100-column terminal: the headline figures (mAP and F1@3 of
    each setting: ZSL, its twins and novel groups, GZSL; SPML's test) and, for the rows that have them, the mAP of
    each branch of the fused score scored alone. `spread` (same shape as rows) adds '± std'. Every figure of
    every row is in --json and log.jsonl."""
    settings = [s for s in ("zsl", *map(zsl_groups.split_name, zsl_groups.GROUPS), "gzsl", "test")
                if any(s in r for r in rows.values())]
    short = {s: zsl_groups.setting_name(s).replace("ZSL ", "") for s in settings}  # ZSL twins -> twins

    def cell(name, s, c):
        def get(r):
            return (r.get("branch_map", {}).get(s, {}).get(c) if c in BRANCHES else r.get(s, {}).get(c)) if r else None
        value, std = get(rows[name]), get((spread or {}).get(name))
        return "-" if value is None else f"{value:.2f}" + (f" ± {std:.2f}" if std is not None else "")

    headline = [(s, c) for s in settings for c in ("map", "f1@3")]
    lines = ([title] if title else []) + _aligned(
        [["method"] + [f"{short[s]} mAP" if c == "map" else "F1@3" for s, c in headline]]
        + [[name] + [cell(name, s, c) for s, c in headline] for name in rows])
    branched = [(name, b) for name, r in rows.items() if r and r.get("branch_map") for b in BRANCHES]
    if branched:
        lines += ["", "Each branch of the fused score alone, mAP:"] + _aligned(
            [["method, branch"] + [short[s] for s in settings]]
            + [[f"{name}, {b}"] + [cell(name, s, b) for s in settings] for name, b in branched])
    return "\n".join(lines)


def format_epoch(record):
    """One line per epoch: the losses and the headline figures."""
    losses = " ".join(f"{k} {v:.4f}" for k, v in record["loss"].items())
    figures = " | ".join(f"{name} mAP {record[name]['map']:.2f} F1@3 {record[name]['f1@3']:.2f}"
                         + "".join(f" {b} {m:.2f}" for b, m in record.get("branch_map", {}).get(name, {}).items()
                                   if m is not None)
                         for name in splits_of(record))
    return f"epoch {record['epoch']}: {losses} | {figures} ({record['seconds']:.0f}s)"


COSINE = "zero-shot CLIP"  # as open_clip scores it: the cosine of the image and each label's prompt
GLOBAL_SCORING = "global, epoch 0"  # the same CLIP scored by SigRL's global branch, before any step


def like_for_like(state, metrics, zero_shot=None):
    """The rows a trained number is read against: zero-shot CLIP's cosine (when `zero_shot` is given), the CLIP
    through SigRL's global branch before any step (the like-for-like zero-shot baseline: the distillation keeps
    that branch near it), SigRL at epoch 0 (untrained heads) and SigRL trained, each with both branches' mAP."""
    rows = {} if zero_shot is None else {COSINE: zero_shot}
    if state.get("epoch0"):
        global0 = {split: per["global"] for split, per in state["epoch0"]["branches"].items()}
        rows.update({GLOBAL_SCORING: global0, "SigRL, epoch 0":
                     {k: v for k, v in state["epoch0"].items() if k != "branches"}})
    rows[f"SigRL, epoch {state['epoch']}"] = metrics
    return rows


def print_run_end(cfg, state, metrics, rows=None):
    """What train.py prints after its last epoch: the trained table, SPML's best epoch and, given `rows`, every
    row a trained number is read against (like_for_like) side by side."""
    print(format_table(metrics, f"\n{cfg.task} / {cfg.data} after epoch {state['epoch']} "
                                f"({os.path.join(cfg.out, 'last.pt')})"))
    if cfg.task == "spml" and state["best"]:
        print(f"best epoch by clean-validation mAP: {state['best']['epoch']} "
              f"(val {state['best']['val_map']:.2f}, test {state['best']['test_map']:.2f}) -> best.pt")
    if rows is not None and len(rows) > 1:
        print(format_comparison(rows, title="\nThe same test images, the same protocol (percent):"))
