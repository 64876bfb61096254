"""What L_tpa's candidate rows hold in a cache: where the off-path mass is, which tokens the teacher
proposes, and what it predicts after them.

    python bench/tpa_rows.py --cache DIR --tokenizer TEACHER_DIR [--samples 1000] [--out FILE]

For every TPA step of the first --samples cached samples (docs/cache-format.md, "What each row
is conditioned on"): the ground-truth next token y = x_{t+1}, the teacher's off-path mass
1 - p_T(y | x_<=t) (p_T(y) read from the response row's top-k; 0 when y is outside it), the
candidates' mass sum_j p_T(a_j), and the top-1 token of p_T(. | x_<=t, a_j). L_tpa averages
steps with equal weight whatever their off-path mass, so "mass share of the top 10% of steps"
says how much of the chain-rule term a few steps hold (`--tpa-max-positions` keeps those).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from alignti.storage.reader import CacheReader


def next_token(sig, t: int) -> int:
    """x_{t+1} of an expanded sequence with at most one image (its token once in text_ids)."""
    p = t + 1
    if sig.n_v and p >= sig.vision_start + sig.n_v:
        p -= sig.n_v - 1
    elif sig.n_v and p >= sig.vision_start:
        raise ValueError(f"sample {sig.sample_id}: position {t + 1} is a vision token, not a response token")
    return int(sig.text_ids[p])


def step_records(reader: CacheReader, samples: int) -> list[dict]:
    """One record per TPA step: y, p_T(y), the candidates, their log-probs, the top-1 token after each."""
    out = []
    for sig in reader.get_batch(np.arange(min(samples, len(reader)))):
        n_resp = len(sig.resp_positions)
        for c, r in enumerate(sig.tpa_rows):
            t = int(sig.resp_positions[r])
            y = next_token(sig, t)
            hit = np.nonzero(sig.topk_ids[r] == y)[0]
            p_y = float(np.exp(sig.topk_logprobs[r, hit[0]])) if hit.size else 0.0
            out.append({"y": y, "p_y": p_y, "index": int(r), "n_resp": n_resp,
                        "cands": sig.tpa_cand_ids[c].tolist(), "cand_lp": sig.tpa_cand_logprobs[c].astype(float).tolist(),
                        "after": sig.tpa_topk_ids[c, :, 0].tolist(),
                        "after_p": np.exp(sig.tpa_topk_logprobs[c, :, 0].astype(float)).tolist()})
    return out


def _top(counter: Counter, total: float, decode, n: int = 10) -> list[list]:
    return [[decode(k), round(v / total, 4)] for k, v in counter.most_common(n)] if total > 0 else []


def summarise(records: list[dict], decode) -> dict:
    """The figures docs/results.md quotes (shares are fractions of the total named)."""
    off = np.array([1.0 - r["p_y"] for r in records])
    cand_mass = np.array([float(np.exp(r["cand_lp"]).sum()) for r in records])
    off_by_y, steps_by_y = Counter(), Counter()
    proposed, after, last = Counter(), Counter(), defaultdict(list)
    for r, o in zip(records, off):
        off_by_y[r["y"]] += o
        steps_by_y[r["y"]] += 1
        u = np.exp(np.array(r["cand_lp"]) - max(r["cand_lp"]))
        u = u / u.sum()
        for a, w, nxt in zip(r["cands"], u, r["after"]):
            proposed[a] += w
            after[nxt] += w
        last["final" if r["index"] >= r["n_resp"] - 3 else "earlier"].append(o)  # "... is X ." + end-of-turn
    ranked = np.sort(off)[::-1]
    top10 = ranked[: max(1, len(ranked) // 10)].sum() / max(ranked.sum(), 1e-12)
    after_p = np.array([p for r in records for p in r["after_p"]])
    return {
        "steps": len(records),
        "off_path_mass": {"mean": float(off.mean()), "median": float(np.median(off)),
                          "steps_over_0.01": float((off > 0.01).mean()), "steps_over_0.1": float((off > 0.1).mean()),
                          "mass_share_of_top_10pct_steps": float(top10),
                          "mean_last_3_rows": float(np.mean(last["final"])) if last["final"] else None,
                          "mean_earlier_rows": float(np.mean(last["earlier"])) if last["earlier"] else None},
        "candidate_mass": {"mean": float(cand_mass.mean()),
                           "share_of_off_path_mass": float(cand_mass.sum() / max(off.sum(), 1e-12))},
        "off_path_mass_by_ground_truth_token": [
            [decode(y), round(m / max(off.sum(), 1e-12), 4), steps_by_y[y]] for y, m in off_by_y.most_common(10)],
        "proposed_tokens_by_teacher_weight": _top(proposed, len(records), decode),
        "teacher_top1_after_candidate_by_weight": _top(after, len(records), decode),
        "teacher_top1_prob_after_candidate_mean": float(after_p.mean()) if after_p.size else None,
    }


def tpa_rows_summary(cache: str | Path, tokenizer: str | Path, samples: int = 1000) -> dict:
    reader = CacheReader.open(str(cache))
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    return {"cache": str(cache), "samples": min(samples, len(reader)),
            **summarise(step_records(reader, samples), lambda i: tok.convert_ids_to_tokens(int(i)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--tokenizer", required=True, help="the teacher's model directory (its tokenizer decodes the ids)")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    summary = tpa_rows_summary(args.cache, args.tokenizer, args.samples)
    text = json.dumps(summary, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
