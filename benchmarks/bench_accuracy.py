"""How far bfloat16, float16, int8 and int4 move a full-size model's answers from its float32 answers.

For each checkpoint, the float32 model answers `caption en` about test_images/cat.jpg greedily for --steps tokens;
then every other variant is loaded as users load it (kernels.accelerate after loading; int8/int4 quantized while
the weights stream) and fed the same tokens (teacher forcing), and each step's logits are compared with float32's:
- relative error: ||logits - float32's|| / ||float32's||, the mean over steps;
- KL(float32 || variant) of the next-token distributions, the mean over steps, in nats;
- greedy agreement: the share of steps whose most likely token is float32's;
- <loc> columns: the mean |error| of the logits of the 1024 location tokens over that of the other tokens (1 means
  detections lose no more than text does).

    python benchmarks/make_checkpoint.py && python benchmarks/make_checkpoint.py --heavy_tails   # once
    python benchmarks/bench_accuracy.py                   # both, 64 steps; a table, and JSON in benchmarks/results/
"""

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_load import DEFAULT_MODEL, RESULTS, ROOT, cpu_name  # noqa: E402

from paligemma import kernels, quantization  # noqa: E402
from paligemma.generate import decode_one_token, generate, prefill  # noqa: E402
from paligemma.processing_paligemma import PaliGemmaProcessor, load_image  # noqa: E402
from paligemma.utils import load_hf_model  # noqa: E402

Scheme = quantization.Scheme
VARIANTS = {  # name -> (dtype, quantization scheme or None)
    "bfloat16": (torch.bfloat16, None), "float16": (torch.float16, None),
    "int8 g128": (torch.bfloat16, Scheme(8, 128)), "int8 g32": (torch.bfloat16, Scheme(8, 32)),
    "int4 g128": (torch.bfloat16, Scheme(4, 128)), "int4 g32": (torch.bfloat16, Scheme(4, 32)),
}
LOC = slice(256000, 257024)  # <loc0000> .. <loc1023>


def load(folder: Path, dtype: torch.dtype, scheme):
    """The model as users run it, with the scheme put where --quantize would find it."""
    if scheme is not None:
        quantization.SCHEMES[scheme.name] = scheme
    model, tokenizer = load_hf_model(folder, "cpu", dtype, verbose=False, quantize=scheme and scheme.name)
    return kernels.accelerate(model), tokenizer


def step_logits(model, inputs: dict, tokens: list[int]) -> torch.Tensor:
    """(len(tokens) + 1, vocab) float32 logits: the prompt's last position, then one decode step per token fed."""
    with torch.inference_mode():
        out = [prefill(model, inputs, len(tokens) + 1).float()[0]]
        input_pos = torch.tensor([inputs["input_ids"].shape[1]])
        for token in tokens:
            out.append(decode_one_token(model, torch.tensor([token]), input_pos).float()[0])
            input_pos += 1
    return torch.stack(out)


def compare(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    error = logits - reference
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    others = torch.cat((error[:, :LOC.start], error[:, LOC.stop:]), dim=1)
    return {"relative_error": (error.norm(dim=-1) / reference.norm(dim=-1)).mean().item(),
            "kl": kl.mean().item(),
            "greedy_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
            "loc_error_ratio": (error[:, LOC].abs().mean() / others.abs().mean()).item()}


def measure(folder: Path, image: Path, steps: int, variants: list[str]) -> dict:
    model, tokenizer = load(folder, torch.float32, None)
    config = model.config
    processor = PaliGemmaProcessor.from_folder(folder, tokenizer, config.vision_config.image_size,
                                               config.num_image_tokens)
    inputs = processor(["caption en"], [load_image(image)])
    with torch.inference_mode():  # float32's own greedy answer, then its logits along it
        tokens = [int(t) for t, _ in generate(model, inputs, steps, stop_ids=())]
    reference = step_logits(model, inputs, tokens[:-1])
    del model
    gc.collect()
    rows = {}
    for name in variants:
        start = time.monotonic()
        model, _ = load(folder, *VARIANTS[name])
        rows[name] = {**compare(step_logits(model, inputs, tokens[:-1]), reference),
                      "seconds": time.monotonic() - start}
        print(f"  {folder.name} {name}: {rows[name]}", file=sys.stderr)
        del model
        gc.collect()
    return {"tokens": tokens, "variants": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_paths", type=Path, nargs="+",
                        default=[DEFAULT_MODEL, DEFAULT_MODEL.with_name(DEFAULT_MODEL.name + "-heavy-tails")])
    parser.add_argument("--image", type=Path, default=ROOT / "test_images" / "cat.jpg")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = {folder.name: measure(folder, args.image, args.steps, args.variants) for folder in args.model_paths}
    print(f"\n{args.steps} teacher-forced steps of `caption en` on {args.image.name}, against float32; {cpu_name()}")
    print("| checkpoint | variant | relative logit error | KL (nats) | greedy agreement | <loc> error / others |")
    print("| --- | --- | --- | --- | --- | --- |")
    for folder, result in results.items():
        for name, row in result["variants"].items():
            print(f"| {folder} | {name} | {row['relative_error']:.4f} | {row['kl']:.2e} | "
                  f"{row['greedy_agreement']:.0%} | {row['loc_error_ratio']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy.json").write_text(json.dumps({"steps": args.steps, "cpu": cpu_name(), **results}, indent=1))
    print(f"wrote {args.out / 'accuracy.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
