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


def format_comparison(rows, title="", spread=None):
    """Methods side by side on the headline figures, plus the mAP of each branch (Eq. 13's local and global
    scores alone) for the rows that have them; `spread` (same shape as rows) adds '± std'."""
    settings = [s for s in ("zsl", *map(zsl_groups.split_name, zsl_groups.GROUPS), "gzsl", "test")
                if any(s in r for r in rows.values())]
    columns = [(s, c) for s in settings for c in ("map", "f1@3", "f1@5") if c != "f1@5" or not s.startswith("zsl_")]
    if any("branch_map" in r for r in rows.values()):
        columns += [(s, b) for s in settings for b in BRANCHES]
    names = {c: c.replace("map", "mAP").replace("f1", "F1") for _, c in columns} | {b: f"{b} mAP" for b in BRANCHES}
    head = "| method | " + " | ".join(f"{zsl_groups.setting_name(s)} {names[c]}" for s, c in columns) + " |"
    lines = ([title] if title else []) + [head, "|" + "---|" * (len(columns) + 1)]

    def cell(r, s, c):
        return (r.get("branch_map", {}).get(s, {}).get(c) if c in BRANCHES else r.get(s, {}).get(c)) if r else None

    for name, r in rows.items():
        cells = []
        for s, c in columns:
            value, std = cell(r, s, c), cell((spread or {}).get(name), s, c)
            cells.append("-" if value is None else f"{value:.2f}" + (f" ± {std:.2f}" if std is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_epoch(record):
    """One line per epoch: the losses and the headline figures."""
    losses = " ".join(f"{k} {v:.4f}" for k, v in record["loss"].items())
    figures = " | ".join(f"{name} mAP {record[name]['map']:.2f} F1@3 {record[name]['f1@3']:.2f}"
                         + "".join(f" {b} {m:.2f}" for b, m in record.get("branch_map", {}).get(name, {}).items()
                                   if m is not None)
                         for name in splits_of(record))
    return f"epoch {record['epoch']}: {losses} | {figures} ({record['seconds']:.0f}s)"


def print_run_end(cfg, state, metrics, rows=None):
    """What train.py prints after its last epoch: the trained table, SPML's best epoch and, given `rows`, every
    row a trained number is read against (eval.like_for_like) side by side."""
    print(format_table(metrics, f"\n{cfg.task} / {cfg.data} after epoch {state['epoch']} "
                                f"({os.path.join(cfg.out, 'last.pt')})"))
    if cfg.task == "spml" and state["best"]:
        print(f"best epoch by clean-validation mAP: {state['best']['epoch']} "
              f"(val {state['best']['val_map']:.2f}, test {state['best']['test_map']:.2f}) -> best.pt")
    if rows is not None and len(rows) > 1:
        print(format_comparison(rows, title="\nThe same test images, the same protocol (percent):"))
