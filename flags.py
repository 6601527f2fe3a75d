"""What the command line accepts: every flag's type and range, flag names, and the quoting that keeps text flags
as typed. All of it is checked before anything is loaded, and each problem is one UserError that names the flag."""

from paligemma.checkpoint import DTYPES
from paligemma.console import UserError, is_number
from paligemma.quantization import SCHEMES

BOOLEAN_FLAGS = ("do_sample", "only_cpu", "ignore_memory_check", "verbose", "compile", "stream")
STRING_FLAGS = ("model_path", "prompt", "image_file_path", "dtype", "output_format", "annotate", "vae_path",
                "prompts_file", "output", "quantize", "save_quantized", "ray_address")
# Sampling divides float32 logits by the temperature: from 1e-3 to 1e3 the quotients stay finite and the softmax
# exact (0 is greedy); beyond, a sample is an argmax or a uniform draw by another name, or not a number at all.
TEMPERATURES = (1e-3, 1e3)
FLAG_RULES = {  # flag -> (test of its value, what it must be)
    "max_tokens_to_generate": (lambda v: type(v) is int and v >= 0, "a whole number >= 0"),
    "temperature": (lambda v: is_number(v) and (v == 0 or TEMPERATURES[0] <= v <= TEMPERATURES[1]),
                    f"0 (greedy) or a number from {TEMPERATURES[0]:g} to {TEMPERATURES[1]:g}"),
    "top_p": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "dtype": (lambda v: v is None or v in DTYPES, f"one of {', '.join(DTYPES)}"),
    "quantize": (lambda v: v in ("none", *SCHEMES), "none, int8 or int4"),
    "output_format": (lambda v: v in ("text", "json"), "text or json"),
    "seed": (lambda v: v is None or type(v) is int and 0 <= v < 2**64, "a whole number from 0 to 2**64 - 1"),
    "max_image_pixels": (lambda v: type(v) is int and v > 0, "a whole number > 0"),
    "batch_size": (lambda v: type(v) is int and v >= 1, "a whole number >= 1"),
    "min_score": (lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "ray_address": (lambda v: v is None or isinstance(v, str) and v.strip() != "", "local, auto or an address"),
    "workers": (lambda v: type(v) is int and v >= 1, "a whole number >= 1"),
    "cpus_per_worker": (lambda v: v is None or type(v) is int and v >= 1, "a whole number >= 1"),
    "gpus_per_worker": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
    "stream": (lambda v: v is None or isinstance(v, bool), "True or False"),
    **{name: (lambda v: isinstance(v, bool), "True or False") for name in BOOLEAN_FLAGS if name != "stream"},
}


def check_flags(flags: dict, rules: dict = FLAG_RULES):
    """Every given flag's type and range by its rule; a UserError names the first bad one."""
    for name, (valid, what) in rules.items():
        if name in flags and not valid(flags[name]):
            raise UserError(f"--{name} must be {what}, not {flags[name]!r}")


def quote_string_flags(argv: list[str], names=STRING_FLAGS) -> list[str]:
    """Quote the values of text flags, so that fire keeps a prompt like "1e3" or "[cat]" as the text typed."""
    out, quote_next = [], False
    for arg in argv:
        name, eq, value = arg.partition("=")
        if quote_next:
            arg, quote_next = repr(arg), False
        elif arg.startswith("--") and name[2:] in names:
            if eq:
                arg = f"{name}={value!r}"
            else:
                quote_next = True
        out.append(arg)
    return out


def check_flag_names(argv: list[str], known: list[str]):
    """Unknown flags, flags without a value and a missing --model_path get one line, not fire's usage screen."""
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        name, eq, _ = arg[2:].partition("=")
        if name not in known and name != "help":
            raise UserError(f"unknown flag --{name}; the flags are --{', --'.join(known)}")
        following = argv[i + 1] if i + 1 < len(argv) else None
        if name in known and name not in BOOLEAN_FLAGS and not eq and (
                following is None or following.startswith("--") and following[2:].partition("=")[0] in known):
            raise UserError(f"--{name} needs a value (write --{name}=VALUE for a value that starts with --)")
    names = [arg[2:].partition("=")[0] for arg in argv if arg.startswith("--")]
    if "model_path" not in names and "help" not in names and not (argv and not argv[0].startswith("-")):
        raise UserError("--model_path is required: the folder of a PaliGemma checkpoint")
