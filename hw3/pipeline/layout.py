"""The course's hw3_data layout (--data), and which parts of it each of run_all's own stages reads; an opt-in stage's
row in the stage table names its own (stage_table.stage_data)."""
from __future__ import annotations

DATA = dict(p1_images="p1_data/val", id2label="p1_data/id2label.json", train_images="p2_data/images/train",
            val_images="p2_data/images/val", train_json="p2_data/train.json", val_json="p2_data/val.json",
            decoder="p2_data/decoder_model.bin", p3_images="p3_data/images")
P2_DATA = ("train_images", "val_images", "train_json", "val_json", "decoder")  # P2's, and the trainings' after it
STAGE_DATA = dict(p1=("p1_images", "id2label"), p2=P2_DATA, p3=("p3_images", "val_images", "decoder"), report=())
IMAGE_FOLDERS = ("p1_images", "train_images", "val_images", "p3_images")
CAPTIONED_FOLDERS = dict(train_images="train", val_images="val")  # image folder -> the split its captions name
