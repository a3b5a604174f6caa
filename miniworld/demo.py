"""The offline demo: the whole bundle on the miniature world, through the same code paths as the real homework.

1. the world (miniworld/generate.py), 2. P1 through p1_clip_zeroshot.py (hw3_1.sh's code) with the tiny CLIP,
3. a short p2_train.py run per PEFT method (proof that training works; loss curves), 4. p2_inference.py (hw3_2.sh's
code) with the converged PEFT checkpoints in miniworld/models, scored by p2_evaluate.py and object F1,
5. p3_visualize.py figures and the pointing game, 6. results.json / results.md and report.pdf.

    python3 -m miniworld.demo --out outputs/demo [--small]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

from common import UserError, atomic_write, read_json, run_main, write_json
from miniworld.train_vit import spec as encoder_spec

MODELS = os.path.join(HERE, "models")
METHODS = ("adapter", "prefix", "lora")
SHORT_RUN = dict(images=48, epochs=1, batch_size=16, val_images=16)


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def say(text: str) -> None:
    print("== " + text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- steps

def make_world(out: str, seed: int, small: bool) -> str:
    from miniworld import generate

    folder = os.path.join(out, "world")
    marker = os.path.join(folder, generate.MARKER)
    if os.path.isfile(marker):
        info = read_json(marker)
        if info.get("seed") == seed and bool(info.get("small")) == small:
            say("world: reusing %s" % folder)
            return folder
    say("world: generating (seed %d%s)" % (seed, ", small" if small else ""))
    generate.generate(folder, seed, small)
    return folder


def p1(world: str, out: str, clip_config: str, clip_weights: str) -> Dict[str, object]:
    """P1 through the CLI of hw3_1.sh: ensemble, single prompt, the report's templates, held-out classes."""
    import p1_clip_zeroshot
    import p1_templates

    folder = os.path.join(out, "p1")
    common = ["--model", clip_config, "--pretrained", clip_weights, "--device", "cpu", "--workers", "0"]
    images, id2label = os.path.join(world, "p1", "val"), os.path.join(world, "p1", "id2label.json")

    def run(name: str, extra: List[str], image_dir: str = images, labels: str = id2label) -> dict:
        csv_path = os.path.join(folder, name + ".csv")
        p1_clip_zeroshot.main([image_dir, labels, csv_path, "--evaluate"] + common + extra)
        return read_json(os.path.join(folder, name + ".eval.json"))

    say("P1: tiny CLIP zero-shot, 50 classes")
    ensemble = run("pred", ["--plot-top5", "3"])
    prompts = [dict(templates=text, accuracy=run("prompt_" + key, ["--templates", key])["accuracy"])
               for key, text in p1_templates.REPORT_TEMPLATES]
    prompts.append(dict(templates="ensemble (%d templates)" % ensemble["n_templates"], accuracy=ensemble["accuracy"]))
    single = run("single", ["--templates", "single"])
    heldout = run("heldout", [], os.path.join(world, "p1_heldout", "val"),
                  os.path.join(world, "p1_heldout", "id2label.json"))
    return dict(p1_accuracy=ensemble["accuracy"], p1_single_prompt_accuracy=single["accuracy"],
                p1_heldout_accuracy=heldout["accuracy"],
                p1_heldout_accuracy_all_classes=heldout_among_all(world, os.path.join(folder, "pred.csv")),
                p1_prompts=prompts)


def heldout_among_all(world: str, pred_csv: str) -> float:
    """Accuracy of the 50-way predictions on the images of the held-out classes only."""
    heldout = set(read_json(os.path.join(world, "p1", "heldout.json"))["labels"])
    with open(pred_csv, encoding="utf-8") as f:
        rows = [(int(r["filename"].split("_")[0]), int(r["label"])) for r in csv.DictReader(f)]
    rows = [(truth, guess) for truth, guess in rows if truth in heldout]
    return sum(truth == guess for truth, guess in rows) / max(1, len(rows))


def subset_annotations(src: str, dst: str, n_images: int) -> str:
    data = read_json(src)
    keep = {img["id"] for img in data["images"][:n_images]}
    data = dict(data, images=[i for i in data["images"] if i["id"] in keep],
                annotations=[a for a in data["annotations"] if a["image_id"] in keep])
    write_json(dst, data, indent=None)
    return dst


def short_training(world: str, out: str, encoder: str, decoder: str, clip_config: str, clip_weights: str) -> dict:
    """A short p2_train.py run per PEFT method on a slice of the world: proof that training runs end to end."""
    import p2_train

    curves = {}
    train_json = subset_annotations(os.path.join(world, "p2", "train.json"), os.path.join(out, "p2", "train_slice.json"),
                                    SHORT_RUN["images"])
    for method in METHODS:
        say("P2: short p2_train.py run, %s" % method)
        run_dir = os.path.join(out, "p2", method, "short_run")
        args = ["--train-json", train_json, "--train-images", os.path.join(world, "p2", "images", "train"),
                "--val-json", os.path.join(world, "p2", "val.json"),
                "--val-images", os.path.join(world, "p2", "images", "val"),
                "--val-max-images", str(SHORT_RUN["val_images"]), "--encoder", encoder, "--decoder-weights", decoder,
                "--peft", method, "--epochs", str(SHORT_RUN["epochs"]), "--batch-size", str(SHORT_RUN["batch_size"]),
                "--lr", "1e-3", "--warmup-steps", "2", "--log-every", "1", "--workers", "0", "--device", "cpu",
                "--clip-model", clip_config, "--clip-pretrained", clip_weights, "--out", run_dir]
        if os.path.isdir(run_dir):
            import shutil

            shutil.rmtree(run_dir)
        p2_train.main(args)
        with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()]
        curves[method] = [(line["step"], line["loss"]) for line in lines if "loss" in line and "step" in line]
    return curves


def plot_curves(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for method, points in curves.items():
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], label=method)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss")
    ax.set_title("short p2_train.py runs on the miniature world")
    ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def p2_scores(world: str, out: str, decoder: str, clip, captioners: str) -> dict:
    """Each converged checkpoint through p2_inference.py (hw3_2.sh's code), p2_evaluate.py and object F1."""
    import metrics
    import p2_inference
    from captioner import read_checkpoint_config
    from miniworld import world as world_lib

    images = os.path.join(world, "p2", "images", "val")
    annotations = os.path.join(world, "p2", "val.json")
    objects = read_json(os.path.join(world, "p2", "val_objects.json"))
    scenes = {os.path.splitext(v["file_name"])[0]: [(o["color"], o["shape"]) for o in v["objects"]]
              for v in objects.values()}
    results = {}
    for method in METHODS:
        checkpoint = os.path.join(captioners, "p2_%s.pt" % method)
        if not os.path.isfile(checkpoint):
            raise UserError("converged checkpoint %s is missing: run python3 -m miniworld.train_captioners" % rel(checkpoint))
        say("P2: %s checkpoint -> p2_inference.py -> p2_evaluate.py" % method)
        folder = os.path.join(out, "p2", method)
        pred = os.path.join(folder, "pred.json")
        p2_inference.main([images, pred, decoder, "--checkpoint", checkpoint, "--device", "cpu", "--num-workers", "0"])
        predictions = read_json(pred)
        scored = metrics.evaluate(predictions, annotations, images, clip=clip, device="cpu")
        write_json(os.path.join(folder, "per_image.json"), scored["per_image"])
        f1 = world_lib.object_scores(predictions, scenes)
        meta = read_checkpoint_config(checkpoint)
        results[method] = dict(cider=scored["CIDEr"], clipscore=scored["CLIPScore"], object_f1=f1["object_f1"],
                               exact_object_set=f1["exact_object_set"], trainable_params=meta["trainable_parameters"],
                               settings=meta.get("settings") or {k: v for k, v in meta["decoder"].items()
                                                                 if v not in (0, None, False)})
    return results


def p3(world: str, out: str, decoder: str, checkpoint: str, method: str) -> dict:
    """Figures of the P3 images and of the best/worst validation captions (p3_visualize.py), and the world-only
    pointing game on the val split (miniworld.pointing, through the product's attention-map hook)."""
    import p3_visualize
    from miniworld import pointing

    common = ["--checkpoint", checkpoint, "--decoder", decoder, "--device", "cpu"]
    say("P3: attention maps with %s" % rel(checkpoint))
    p3_visualize.main(["--images", os.path.join(world, "p3", "images"), "--out", os.path.join(out, "p3")] + common)
    p3_visualize.main(["--images", os.path.join(world, "p2", "images", "val"), "--out",
                       os.path.join(out, "p3", "best_worst"), "--from-scores",
                       os.path.join(out, "p2", method, "per_image.json"), "--top", "1", "--bottom", "1"]
                      + common)
    say("P3: pointing game over the validation split")
    pointing.main(["--images", os.path.join(world, "p2", "images", "val"), "--out", os.path.join(out, "pointing.json"),
                   "--objects", os.path.join(world, "p2", "val_objects.json")] + common)
    summary = read_json(os.path.join(out, "pointing.json"))
    return dict(pointing_game=summary.get("pointing_game"), pointing_trials=summary.get("pointing_trials"))


# ----------------------------------------------------------------------------------------------- results

def results_table(results: dict) -> str:
    lines = ["| measure | value |", "| --- | --- |"]
    for key in ("p1_accuracy", "p1_single_prompt_accuracy", "p1_heldout_accuracy", "p1_heldout_accuracy_all_classes"):
        lines.append("| %s | %.4f |" % (key, results[key]))
    lines += ["", "| PEFT | CIDEr | CLIPScore | object F1 | exact object set | trainable params |",
              "| --- | --- | --- | --- | --- | --- |"]
    for method, r in results["p2"].items():
        lines.append("| %s%s | %.4f | %.4f | %.4f | %.4f | %s |" % (
            method, " (best)" if method == results["p2_best"] else "", r["cider"], r["clipscore"], r["object_f1"],
            r["exact_object_set"], "{:,}".format(r["trainable_params"])))
    lines += ["", "attention pointing game: %s over %s shape words" % (
        "n/a" if results["pointing_game"] is None else "%.4f" % results["pointing_game"], results["pointing_trials"])]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "outputs", "demo"), help="the one output folder")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed")
    parser.add_argument("--small", action="store_true", help="a reduced world (CI): seconds instead of minutes")
    parser.add_argument("--skip-training", action="store_true", help="no short p2_train.py runs")
    parser.add_argument("--clip-config", default=os.path.join(MODELS, "tiny_clip.json"), help="tiny CLIP config")
    parser.add_argument("--clip-weights", default=os.path.join(MODELS, "tiny_clip.pt"), help="tiny CLIP weights")
    parser.add_argument("--decoder-weights", default=os.path.join(MODELS, "decoder_model.bin"),
                        help="tiny GPT-2 in the course's decoder_model.bin format")
    parser.add_argument("--captioners", default=MODELS, help="folder of the converged p2_<method>.pt checkpoints")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    started = time.time()
    for path in (args.clip_config, args.clip_weights, args.decoder_weights):
        if not os.path.isfile(path):
            raise UserError("%s is missing: run `bash miniworld/build_models.sh`" % rel(path))
    out = os.path.abspath(args.out)
    world = make_world(out, args.seed, args.small)
    results: Dict[str, object] = dict(source="miniature world, seed %d%s (tiny models trained from scratch here; "
                                             "not the homework's data)" % (args.seed, ", small" if args.small else ""))
    results.update(p1(world, out, args.clip_config, args.clip_weights))
    encoder = encoder_spec()  # the converged captioners' encoder (the tiny CLIP's tower, fine-tuned densely)
    files = dict(p1_top5="p1/pred.top5.png", p3_index="p3/index.md", p3_best_worst="p3/best_worst/attention.json")
    if not args.skip_training:
        curves = short_training(world, out, encoder, args.decoder_weights, args.clip_config, args.clip_weights)
        plot_curves(curves, os.path.join(out, "p2", "loss_curves.png"))
        files["p2_loss_curves"] = "p2/loss_curves.png"
        results["p2_short_run_loss"] = {m: [c[0][1], c[-1][1]] if c else None for m, c in curves.items()}
    import clip_utils

    clip = clip_utils.load_clip(args.clip_config, args.clip_weights, "cpu")
    results["p2"] = p2_scores(world, out, args.decoder_weights, clip, args.captioners)
    results["p2_best"] = max(results["p2"], key=lambda m: results["p2"][m]["object_f1"])
    best = os.path.join(args.captioners, "p2_%s.pt" % results["p2_best"])
    results.update(p3(world, out, args.decoder_weights, best, results["p2_best"]))
    results["files"] = files
    results["seconds"] = round(time.time() - started, 1)
    write_json(os.path.join(out, "results.json"), results)
    table = results_table(results)
    with atomic_write(os.path.join(out, "results.md")) as f:
        f.write(table)
    import make_report

    make_report.build(out, os.path.join(out, "report.pdf"))
    print(table)
    print("demo outputs in %s (results.json, results.md, report.pdf; %.0f s)" % (out, results["seconds"]))
    return 0


if __name__ == "__main__":
    run_main(main)
