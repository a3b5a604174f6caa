"""The p3 stage: attention figures of p3_data/images, and of the best and worst validation captions by CLIPScore
(p3_visualize.py with P2's shipped captioner)."""
from __future__ import annotations

from hw3.attention import visualize
from hw3.pipeline.context import Context, steps
from hw3.util.files import read_json


def stage_p3(ctx: Context) -> dict:
    checkpoint = ctx.results["p2_shipping"]["checkpoint"]
    common = ["--checkpoint", checkpoint, "--decoder", ctx.data("decoder"), "--device", ctx.args.device]
    with steps(2, "p3") as bar:
        visualize.main(["--images", ctx.data("p3_images"), "--out", ctx.path("p3")] + common)
        bar.update(1)
        visualize.main(["--images", ctx.data("val_images"), "--out", ctx.path("p3", "best_worst"),
                           "--from-scores", ctx.path("p2", "p2_best.per_image.json"), "--top", "1", "--bottom", "1"]
                          + common)
        bar.update(1)
    figures = read_json(ctx.path("p3", "best_worst", "attention.json"))["figures"]
    return dict(p3_best_worst=[dict(image=e["image"], caption=e["caption"], clipscore=e["score"]) for e in figures],
                files=dict(p3_index="p3/index.md", p3_best_worst="p3/best_worst/attention.json"), outputs=["p3"])
