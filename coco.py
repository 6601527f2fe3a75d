"""A COCO results file from this tool's results, for pycocotools or supervision:

    python coco.py answers.jsonl coco-results.json [--annotations instances_val2017.json]

It reads the JSON lines of a run (`--output`, or a batch run's stdout), skips records with an `error` and answers
without objects, and writes a JSON list with one entry per detected or segmented object:
{"image_id", "category", "bbox": [x, y, width, height] in pixels, "score", "segmentation": the mask's run-length
encoding (segments decoded with --vae_path only)}. Objects without a score are left out (COCO ranks by it).

image_id: with --annotations, a COCO annotations file, the id of its image whose file name is the record's image's
file name, and each entry gains "category_id", the id of the category named by the object's label (case ignored;
objects with any other label are left out, and counted on stderr). Without it, the image's file name read as a
number, as COCO names its files: 000000397133.jpg is 397133.
"""

import argparse
import json
import sys
from pathlib import Path

from paligemma.console import UserError, log, one_line
from paligemma.results import identity


def read_records(path: Path) -> list[dict]:
    """This tool's records in a results file; a line that is not one is a UserError naming it."""
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read the results ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: the results are not UTF-8 text") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if identity(record) is None:
            raise UserError(f"{path}:{number}: not a record of this tool")
        records.append(record)
    return records


def read_annotations(path: Path) -> dict:
    """A COCO annotations file's images and categories, checked for the fields used here."""
    try:
        annotations = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the annotations ({one_line(e)})") from None
    fields = {"images": ("file_name", str), "categories": ("name", str)}
    for key, (name, kind) in fields.items():
        entries = annotations.get(key) if isinstance(annotations, dict) else None
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get(name), kind) and type(e.get("id")) is int for e in entries):
            raise UserError(f'{path}: not COCO annotations: expected "{key}": [{{"id": int, "{name}": str}}, ...]')
    return annotations


def image_ids(records: list[dict], annotations: dict | None) -> dict[str, int]:
    """Each record's image -> its COCO image_id (the module's docstring says how)."""
    by_name = {Path(image["file_name"]).name: image["id"] for image in (annotations or {}).get("images", [])}
    ids = {}
    for image in {record["image"] for record in records}:
        name = Path(image).name
        if annotations is not None and name not in by_name:
            raise UserError(f"{image}: no image named {name} in the annotations")
        if annotations is None and not (Path(image).stem.isascii() and Path(image).stem.isdigit()):
            raise UserError(f"{image}: its name is not a number, so its image_id must come from --annotations")
        ids[image] = by_name[name] if annotations is not None else int(Path(image).stem)
    return ids


def coco_results(records: list[dict], annotations: dict | None = None) -> list[dict]:
    """One COCO result per scored object of the records, in their order (the module's docstring says what)."""
    answered = [r for r in records if "error" not in r and ("detections" in r or "segments" in r)]
    ids = image_ids(answered, annotations)
    categories = {c["name"].lower(): c["id"] for c in (annotations or {}).get("categories", [])}
    entries, unnamed, unscored = [], set(), 0
    for record in answered:
        for obj in record.get("detections", []) + record.get("segments", []):
            label = obj["label"]
            if obj.get("score") is None:
                unscored += 1
                continue
            if annotations is not None and label.lower() not in categories:
                unnamed.add(label)
                continue
            x0, y0, x1, y1 = obj["box"]
            entry = {"image_id": ids[record["image"]], "category": label,
                     "bbox": [x0, y0, round(x1 - x0, 1), round(y1 - y0, 1)], "score": obj["score"]}
            if annotations is not None:
                entry["category_id"] = categories[label.lower()]
            if "mask" in obj:
                entry["segmentation"] = obj["mask"]
            entries.append(entry)
    if unnamed:
        log(f"note: left out objects whose label names no category: {', '.join(sorted(map(repr, unnamed)))}")
    if unscored:
        log(f"note: left out {unscored} objects without a score")
    return entries


def main(argv: list[str] | None = None):
    """The command line: results file in, COCO results file out."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a results file of inference.py (JSON Lines)")
    parser.add_argument("out", type=Path, help="the COCO results file to write (JSON)")
    parser.add_argument("--annotations", type=Path, help="a COCO annotations file, for image and category ids")
    args = parser.parse_args(argv)
    try:
        annotations = None if args.annotations is None else read_annotations(args.annotations)
        entries = coco_results(read_records(args.results), annotations)
        try:
            args.out.write_text(json.dumps(entries, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
        except OSError as e:
            raise UserError(f"{args.out}: cannot write the COCO results ({e.strerror})") from None
    except UserError as e:
        log(f"error: {one_line(e)}")
        sys.exit(1)
    log(f"{len(entries)} objects written to {args.out}")


if __name__ == "__main__":
    main()
