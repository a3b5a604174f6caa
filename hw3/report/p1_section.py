"""P1 in the report: why CLIP classifies zero-shot, the prompt table, and whether a template's difference lies
beyond sampling noise (an exact paired interval over the same images), then the top-5 figure."""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

from hw3.report.layout import Report
from hw3.report.questions import QUESTIONS
from hw3.report.wording import fmt
from hw3.zeroshot.prompt_templates import REPORT_TEMPLATES

CLIP_WHY = (
    "CLIP learns one embedding space for images and text from hundreds of millions of image-caption pairs with a "
    "contrastive loss: the caption of an image must be closer to it than every other caption in the batch. A class "
    "is therefore not an index into a fixed output layer, as in a VGG or ResNet classifier, but a sentence; any set "
    "of classes becomes a classifier by embedding one prompt per class and taking the most similar one. Because the "
    "captions cover open-ended concepts, styles and contexts, the image features are general, and the text encoder "
    "already knows the names of classes it never saw as labels. Prompt ensembling (averaging the class embedding "
    "over templates such as 'a photo of a {}.') reduces the mismatch between a bare class name and the captions "
    "CLIP was trained on.")

CONFIDENCE = 0.95  # of the paired intervals between templates

def binomial_cdf(k: int, m: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(m, p), summed in logs (m is a count of images, up to a few thousand)."""
    if p <= 0:
        return 1.0
    if p >= 1:
        return 1.0 if k >= m else 0.0
    logs = [math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) + i * math.log(p)
            + (m - i) * math.log1p(-p) for i in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def clopper_pearson(k: int, m: int, confidence: float = CONFIDENCE) -> Tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a binomial proportion k/m, by bisection on the binomial tails."""
    tail = (1 - confidence) / 2

    def solve(inside) -> float:
        low, high = 0.0, 1.0
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if inside(mid) else (low, mid)
        return (low + high) / 2
    lower = 0.0 if k == 0 else solve(lambda p: 1 - binomial_cdf(k - 1, m, p) < tail)
    upper = 1.0 if k == m else solve(lambda p: binomial_cdf(k, m, p) > tail)
    return lower, upper


def paired_interval(paired: dict) -> Tuple[float, float, float]:
    """(difference, lower, upper) in accuracy points of one template against another on the same images: exact
    McNemar, i.e. the Clopper-Pearson interval of the discordant images' split, scaled by their share."""
    gained, lost, n = paired["gained"], paired["lost"], paired["n"]
    discordant = gained + lost
    if not discordant:
        return 0.0, 0.0, 0.0
    lower, upper = clopper_pearson(gained, discordant)
    scale = 100.0 * discordant / n
    return 100.0 * (gained - lost) / n, scale * (2 * lower - 1), scale * (2 * upper - 1)


def noise_text(paired: Optional[dict]) -> Tuple[Optional[bool], str]:
    """(beyond sampling noise?, the interval in words); (None, "") without per-image results."""
    if not paired:
        return None, ""
    _, lower, upper = paired_interval(paired)
    beyond = lower > 0 or upper < 0
    return beyond, "%d%% interval %+.1f to %+.1f points, exact McNemar over the %d images%s" % (
        round(100 * CONFIDENCE), lower, upper, paired["n"],
        "" if beyond else ": within sampling noise, so the two are indistinguishable on this data")


def prompt_analysis(prompts: Sequence[dict]) -> str:
    """What the prompt table shows: a difference, its paired interval, and a cause only where the difference lies
    beyond sampling noise."""
    rows = {p["templates"]: p for p in prompts}
    photo, negated, noise = (rows.get(text) for _, text in REPORT_TEMPLATES)
    parts = []
    if photo and negated:
        gap = 100 * (negated["accuracy"] - photo["accuracy"])
        beyond, interval = noise_text(negated.get("paired"))
        parts.append("The negated prompt changes accuracy by %+.1f points against 'This is a photo of {}'%s%s." % (
            gap, " (%s)" % interval if interval else "",
            ": CLIP's text encoder, trained on captions that rarely negate, reads 'not a photo of X' mostly as 'X'"
            if beyond and abs(gap) < 3 else ""))
    if photo and noise:
        worse = noise["accuracy"] < photo["accuracy"]
        beyond, interval = noise_text(noise.get("paired"))
        parts.append("'No {}, no score.' %s (%+.1f points%s)%s." % (
            "costs accuracy" if worse else "does not cost accuracy", 100 * (noise["accuracy"] - photo["accuracy"]),
            "; " + interval if interval else "",
            ": its extra words carry meaning of their own that pulls every class embedding the same way"
            if worse and beyond else ""))
    ensemble = [p for p in prompts if p["templates"].startswith("ensemble")]
    singles = [p["accuracy"] for p in prompts if not p["templates"].startswith("ensemble")]
    if ensemble and singles:
        wins = ensemble[0]["accuracy"] > max(singles)
        beyond, interval = noise_text(ensemble[0].get("paired"))
        parts.append("The template ensemble %s the best single report template (%s vs %s%s)%s." % (
            "beats" if wins else "does not beat", fmt(ensemble[0]["accuracy"]), fmt(max(singles)),
            "; " + interval if interval else "",
            ": averaging embeddings over templates cancels the quirks of any one wording" if wins and beyond else ""))
    if parts and not any(p.get("paired") for p in prompts):
        parts.append("The results hold no per-image predictions (an older run_all.py wrote them), so whether these "
                     "differences lie beyond sampling noise is not measured, and no cause is given.")
    return " ".join(parts)


def p1_section(report: Report, results: dict, folder: str):
    report.heading("Problem 1: zero-shot image classification with CLIP")
    if results.get("p1_model"):
        report.paragraph("CLIP model: %s." % results["p1_model"])
    report.heading(QUESTIONS["p1_methods"], 3)
    report.paragraph(CLIP_WHY)
    report.heading(QUESTIONS["p1_prompts"], 3)
    prompts = results.get("p1_prompts") or []
    if prompts:
        report.table(["templates", "accuracy on p1_data/val"], [[p["templates"], fmt(p["accuracy"])] for p in prompts],
                     widths=(0.7, 0.3))
        report.paragraph(prompt_analysis(prompts))
    else:
        report.paragraph("The results hold no prompt comparison (the p1 stage did not run).")
    overall = [(results.get(key), what) for key, what in (("p1_accuracy", "prompt ensemble"),
                                                          ("p1_single_prompt_accuracy", "single prompt"))]
    overall = ["%s (%s)" % (fmt(value), what) for value, what in overall if value is not None]
    if overall:
        report.paragraph("Accuracy over all validation images: %s." % ", ".join(overall))
    if results.get("p1_heldout_accuracy") is not None:  # miniature world only
        report.paragraph("Held-out colour-shape combinations never seen in training captions: %s among the held-out "
                         "classes, %s among all classes." % (fmt(results.get("p1_heldout_accuracy")),
                                                            fmt(results.get("p1_heldout_accuracy_all_classes"))))
    report.heading(QUESTIONS["p1_top5"], 3)
    top5 = results.get("files", {}).get("p1_top5", "p1/pred.top5.png")
    report.image(os.path.join(folder, top5), top5, caption="Three validation images, each with the probabilities of "
                 "its five most similar classes (p1_clip_zeroshot.py --plot-top5 3).")
