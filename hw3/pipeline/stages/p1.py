"""The p1 stage: zero-shot classification on p1_data/val with accuracy, the report's three prompts and the ensemble,
and the top-5 figure, from one p1_clip_zeroshot.py run."""
from __future__ import annotations

import os
from typing import Optional

from hw3.pipeline.context import Context
from hw3.util.files import read_json
from hw3.zeroshot import classify, prompt_templates

TOP5_IMAGES = 3


def stage_p1(ctx: Context) -> dict:
    """One p1_clip_zeroshot.py run (one CLIP load, one image pass): the ensemble's p1/pred.{csv,eval.json}, the
    top-5 figure, and with --compare-prompts p1/pred.prompt_<set>.{csv,eval.json} for the report's three templates
    and the single prompt, and the table p1/pred.prompts.md."""
    csv_path = ctx.path("p1", "pred.csv")
    classify.main([ctx.data("p1_images"), ctx.data("id2label"), csv_path, "--evaluate", "--compare-prompts",
                           "--plot-top5", str(TOP5_IMAGES)] + ctx.p1_flags())
    ensemble = read_json(classify.sidecar(csv_path, ".eval.json"))

    compared = {key: read_json(classify.compared_path(csv_path, key, ".eval.json"))
                for key in [k for k, _ in prompt_templates.REPORT_TEMPLATES] + ["single"]}

    def accuracy(key: str) -> float:
        return compared[key]["accuracy"]

    prompts = [dict(templates=text, accuracy=accuracy(key)) for key, text in prompt_templates.REPORT_TEMPLATES]
    reference = prompt_templates.REPORT_TEMPLATES[0][0]  # 'This is a photo of {}': what the other two are set against
    for (key, _), row in zip(prompt_templates.REPORT_TEMPLATES[1:], prompts[1:]):
        row["paired"] = paired(compared[reference], compared[key])
    best = max((k for k, _ in prompt_templates.REPORT_TEMPLATES), key=accuracy)
    prompts.append(dict(templates="ensemble (%d templates)" % ensemble["n_templates"], accuracy=ensemble["accuracy"],
                        paired=paired(compared[best], ensemble)))
    return dict(p1_accuracy=ensemble["accuracy"], p1_single_prompt_accuracy=accuracy("single"), p1_prompts=prompts,
                p1_model="%s / %s" % (ensemble["model"], ensemble["pretrained"]),
                files=dict(p1_top5="p1/pred.top5.png", p1_prompts="p1/pred.prompts.md"),
                outputs=["p1/pred.csv", "p1/pred.eval.json"] + [
                    os.path.relpath(classify.compared_path(csv_path, key, suffix), ctx.out)
                    for key in [k for k, _ in prompt_templates.REPORT_TEMPLATES] + ["single"]
                    for suffix in (".csv", ".eval.json")])


def paired(reference: dict, other: dict) -> Optional[dict]:
    """Two evaluations of the same images, image by image: how many only `other` gets right (gained) and only
    `reference` does (lost), the counts the report's exact McNemar interval needs; None from an older p1."""
    a, b = reference.get("correct"), other.get("correct")
    if not a or not b or len(a) != len(b):
        return None
    return dict(n=len(a), gained=sum(x == "0" and y == "1" for x, y in zip(a, b)),
                lost=sum(x == "1" and y == "0" for x, y in zip(a, b)))
