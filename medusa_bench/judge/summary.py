"""A judgment's summary: per decoder (and turn, and category) the mean score or the win rate,
with how many of the expected judgments were made (`summarize_single`, `summarize_pairwise`),
and the terminal table `medusa-bench judge` ends with (`summary_table`)."""

from __future__ import annotations

from medusa_bench.judge import mtbench


def _expected_rows(answers, question_map, selected):
    """(model_id, decoder, turn, category) for every turn that should have a judgment."""
    for model_id in selected:
        for qid, answer in answers[model_id].items():
            question = question_map[qid]
            for turn in range(1, min(len(question["turns"]), 2) + 1):
                yield model_id, answer.decoder, turn, question.get("category", "")


def summarize_single(records, answers, question_map, selected):
    """DataFrame: decoder × turn × category with mean score, counts and coverage.

    Rows with category "all" aggregate a turn; turn 0 aggregates both turns. `coverage` is
    valid (parsed) judgments / expected judgments; unparsed (-1) judgments are missing.
    """
    import pandas as pd

    expected = pd.DataFrame(list(_expected_rows(answers, question_map, selected)), columns=["model", "decoder", "turn", "category"])
    judged = pd.DataFrame(
        [
            {"model": r["model"], "turn": r.get("turn", 1), "question_id": r["question_id"], "score": r["score"],
             "reused": bool(r.get("reused_from")), "category": question_map.get(r["question_id"], {}).get("category", "")}
            for r in records if r.get("model") in selected
        ],
        columns=["model", "turn", "question_id", "score", "reused", "category"],
    ).drop_duplicates(["model", "turn", "question_id"], keep="last")
    judged["valid"] = judged["score"] != mtbench.UNPARSED
    rows = []
    for key, exp_c, got_c in _cells(expected, judged):
        valid = got_c[got_c["valid"]]
        rows.append({
            **key, "score": float(valid["score"].mean()) if len(valid) else float("nan"),
            "valid": int(len(valid)), "judged": int(len(got_c)), "unparsed": int((~got_c["valid"]).sum()),
            "reused": int(got_c["reused"].sum()), "expected": int(len(exp_c)),
            "coverage": len(valid) / len(exp_c) if len(exp_c) else float("nan"),
        })
    return pd.DataFrame(rows)


def _cells(expected, got):
    """({decoder, model, turn, category}, expected rows, got rows) per decoder × turn (0: both) × category ("all": every one)."""
    for (model, decoder), group in expected.groupby(["model", "decoder"], sort=False):
        mine = got[got["model"] == model]
        for turn in sorted(group["turn"].unique().tolist()) + [0]:
            exp_t = group if turn == 0 else group[group["turn"] == turn]
            got_t = mine if turn == 0 else mine[mine["turn"] == turn]
            for category in sorted(exp_t["category"].unique().tolist()) + ["all"]:
                exp_c = exp_t if category == "all" else exp_t[exp_t["category"] == category]
                got_c = got_t if category == "all" else got_t[got_t["category"] == category]
                yield {"decoder": decoder, "model": model, "turn": turn, "category": category}, exp_c, got_c


def summarize_pairwise(records, answers, question_map, selected, baseline_id):
    """DataFrame: decoder × turn × category with wins, losses, ties against the baseline.

    Inconsistent verdicts across the two orders count as ties (FastChat's rule); a game with
    an unparseable verdict is an error, missing from coverage.
    """
    import pandas as pd

    expected = pd.DataFrame(list(_expected_rows(answers, question_map, selected)), columns=["model", "decoder", "turn", "category"])
    games = []
    for r in records:
        if r.get("model_1") not in selected or r.get("model_2") != baseline_id:
            continue
        g1, g2 = r.get("g1_winner"), r.get("g2_winner")
        if "error" in (g1, g2):
            outcome = "error"
        elif g1 != g2 or g1 == "tie":
            outcome = "tie"
        else:
            outcome = "win" if g1 == "model_1" else "loss"
        games.append({"model": r["model_1"], "turn": r.get("turn", 1), "question_id": r["question_id"], "outcome": outcome,
                      "category": question_map.get(r["question_id"], {}).get("category", "")})
    games = pd.DataFrame(games, columns=["model", "turn", "question_id", "outcome", "category"]).drop_duplicates(
        ["model", "turn", "question_id"], keep="last")
    rows = []
    for key, exp_c, got_c in _cells(expected, games):
        counts = got_c["outcome"].value_counts()
        win, loss, tie = (int(counts.get(k, 0)) for k in ("win", "loss", "tie"))
        valid = win + loss + tie
        rows.append({
            **key, "win": win, "loss": loss, "tie": tie, "error": int(counts.get("error", 0)),
            "win_rate_adjusted": (win + 0.5 * tie) / valid if valid else float("nan"),
            "expected": int(len(exp_c)), "coverage": valid / len(exp_c) if len(exp_c) else float("nan"),
        })
    return pd.DataFrame(rows)


def summary_table(result):  # a judge.run.JudgeResult (not imported: run imports this module)
    """A rich Table: one row per decoder × turn, one column per category (+ all)."""
    from rich.table import Table

    frame = result.summary
    title = f"{'MT-Bench score' if result.mode == 'single' else 'vs baseline (win/loss/tie)'} — {result.path.name}"
    table = Table(title=title, title_justify="left")
    if frame is None or frame.empty:
        return table
    categories = [c for c in dict.fromkeys(frame["category"]) if c != "all"] + ["all"]
    table.add_column("decoder")
    table.add_column("turn")
    for category in categories:
        table.add_column(category, justify="right")
    for (decoder, model, turn), group in frame.groupby(["decoder", "model", "turn"], sort=False):
        cells = {}
        for _, row in group.iterrows():
            if result.mode == "single":
                value = "–" if row["valid"] == 0 else f"{row['score']:.2f}"
            else:
                value = f"{row['win']}/{row['loss']}/{row['tie']}"
            cells[row["category"]] = f"{value} ({row['coverage']:.0%})"
        table.add_row(decoder, "all" if turn == 0 else str(turn), *(cells.get(c, "") for c in categories))
    table.caption = "cells: value (coverage = valid judgments / expected); unparseable verdicts count as missing"
    return table
