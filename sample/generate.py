"""Regenerate the demo sample's images and RefCOCO files (deterministic; the output is committed).

    .venv/bin/python sample/generate.py

The pictures are synthetic; their relations are what the demo shows: an exact duplicate, a near
duplicate, evaluation images copied into the web sources (removed by appearance), and ids that
overlap the evaluation sets (removed by identity).
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.fixtures.images import brightened, cropped, jpeg, recompressed, resized, synthetic_photo  # noqa: E402

IMAGES = HERE / "images"


def save(rel: str, data: bytes) -> None:
    path = IMAGES / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def jpg(image) -> bytes:
    return jpeg(image, 80)


def main() -> None:
    photo = {i: synthetic_photo(9000 + i, (320, 240)) for i in range(20)}
    # COCO train2014 (captions source) and val2014 (Karpathy restval/val/test)
    for cid, pid in [(9, 0), (25, 1), (30, 2), (34, 3)]:
        save(f"coco/train2014/COCO_train2014_{cid:012d}.jpg", jpg(photo[pid]))
    for cid, pid in [(42, 4), (73, 5), (74, 6)]:
        save(f"coco/val2014/COCO_val2014_{cid:012d}.jpg", jpg(photo[pid]))
    # Flickr30K (evaluation only)
    save("flickr30k/1000092795.jpg", jpg(photo[7]))
    save("flickr30k/1000268201.jpg", jpg(photo[8]))
    # Visual Genome: image 2 is COCO 30 at another size (a near duplicate); 1 and 3 are their own
    save("vg/VG_100K_2/1.jpg", jpg(photo[9]))
    save("vg/VG_100K/2.jpg", jpg(resized(photo[2], 0.75)))
    save("vg/VG_100K/3.jpg", jpg(photo[10]))
    # Web images (CC, SBU), served on loopback by `uniter demo`
    save("web/cc/0001.jpg", jpg(photo[11]))
    save("web/cc/0002.jpg", jpg(photo[12]))
    save("web/cc/0003.jpg", jpeg(resized(photo[8], 0.5), 70))  # a Flickr30K test image, shrunk
    save("web/cc/0004.jpg", jpg(photo[12]))  # byte-identical to 0002: an exact duplicate
    save("web/cc/0005.jpg", jpg(photo[13]))
    save("web/cc/0006.jpg", jpg(photo[14]))
    save("web/sbu/4385058960_b0f291553e.jpg", jpg(brightened(photo[15], 1.1)))
    save("web/sbu/5148648301_1174ef1011.jpg", jpg(photo[16]))
    save("web/sbu/1000092795_a3b2c1d4e5.jpg", jpg(recompressed(cropped(photo[7], 0.04), 60)))  # Flickr30K again
    save("web/sbu/6214452183_0e7f5c4d3b.jpg", jpg(photo[17]))

    # RefCOCO (unc): refs pickle of builtins + instances.json; COCO 25 is in its val split
    refs = [
        {
            "ref_id": 0,
            "ann_id": 1001,
            "image_id": 25,
            "split": "val",
            "category_id": 25,
            "file_name": "COCO_train2014_000000000025_1001.jpg",
            "sentences": [{"tokens": ["giraffe", "on", "left"], "raw": "giraffe on left", "sent_id": 0}],
            "sent_ids": [0],
        },
        {
            "ref_id": 1,
            "ann_id": 1002,
            "image_id": 9,
            "split": "train",
            "category_id": 51,
            "file_name": "COCO_train2014_000000000009_1002.jpg",
            "sentences": [{"tokens": ["bowl", "of", "broccoli"], "raw": "bowl of broccoli", "sent_id": 1}],
            "sent_ids": [1],
        },
    ]
    (HERE / "refcoco").mkdir(exist_ok=True)
    with open(HERE / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    instances = {
        "images": [
            {
                "id": 25,
                "file_name": "COCO_train2014_000000000025.jpg",
                "width": 320,
                "height": 240,
                "flickr_url": "http://farm9.staticflickr.com/8090/8424963022_8f0a8a1c4f_z.jpg",
            },
            {
                "id": 9,
                "file_name": "COCO_train2014_000000000009.jpg",
                "width": 320,
                "height": 240,
                "flickr_url": "http://farm5.staticflickr.com/4026/4614312466_9b8b6a5a1d_z.jpg",
            },
        ],
        "annotations": [
            {"id": 1001, "image_id": 25, "bbox": [10, 20, 100, 200], "category_id": 25},
            {"id": 1002, "image_id": 9, "bbox": [50, 60, 120, 90], "category_id": 51},
        ],
        "categories": [{"id": 25, "name": "giraffe"}, {"id": 51, "name": "bowl"}],
    }
    (HERE / "refcoco" / "instances.json").write_text(json.dumps(instances, indent=1))
    vqa()


def vqa() -> None:
    """VQA v2 files on the sample's COCO images: train on train2014, validate on val2014. Ten human
    answers per question, not always unanimous (soft scores, the 10-choose-9 metric)."""
    colors = ["red", "green", "blue", "white"]
    splits = {"train": [9, 25, 30, 34], "val": [42, 73, 74]}
    for split, image_ids in splits.items():
        questions, annotations = [], []
        for image_id in image_ids:
            color = colors[image_id % 4]
            asked = [
                ("What color is the biggest shape?", "other", [color] * 8 + [colors[(image_id + 1) % 4]] * 2),
                (
                    "Is there a circle?",
                    "yes/no",
                    ["yes" if image_id % 2 else "no"] * 9 + ["no" if image_id % 2 else "yes"],
                ),
                ("How many shapes are there?", "number", [str(2 + image_id % 3)] * 7 + ["3"] * 3),
            ]
            for k, (text, kind, answers) in enumerate(asked):
                qid = image_id * 1000 + k
                questions.append({"image_id": image_id, "question": text, "question_id": qid})
                annotations.append(
                    {
                        "question_type": text.split()[0].lower(),
                        "multiple_choice_answer": answers[0],
                        "answers": [
                            {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)
                        ],
                        "image_id": image_id,
                        "answer_type": kind,
                        "question_id": qid,
                    }
                )
        info = {"description": "uniter-pipeline demo sample", "version": "2.0"}
        folder = HERE / "vqa"
        folder.mkdir(exist_ok=True)
        (folder / f"v2_OpenEnded_mscoco_{split}2014_questions.json").write_text(
            json.dumps(
                {
                    "info": info,
                    "task_type": "Open-Ended",
                    "data_type": "mscoco",
                    "data_subtype": f"{split}2014",
                    "questions": questions,
                },
                indent=1,
            )
        )
        (folder / f"v2_mscoco_{split}2014_annotations.json").write_text(
            json.dumps(
                {"info": info, "data_type": "mscoco", "data_subtype": f"{split}2014", "annotations": annotations},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
