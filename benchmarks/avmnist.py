"""The fusion comparison on records built from real data, AV-MNIST style (Vielzeuf et al. 2018):

    nice -n 10 python benchmarks/avmnist.py [--seeds 0 1 2] [--epochs 16] [--out runs/avmnist]

Each record pairs one of scikit-learn's 1,797 handwritten digit scans (in its wheel), degraded (Gaussian noise,
and a 4 x 4 block of the 8 x 8 scan blanked in half of them), with the same digit spoken by eSpeak NG (held-out
voices in test), degraded (white noise at -6 to +6 dB SNR); the target is the digit. Scans are split 80/20 by
digit as the default dataset splits them. Then benchmarks/fusion.py's comparison over the two inputs: fused
(`image` + `speech`) against each alone, late fusion, and each input absent from every other held-out record
against the model of the other input alone. Writes --out/records/{train,test}.csv with the files, and --out/avmnist.json.
"""

from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml
from PIL import Image
from rich.console import Console
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from fusion import ROOT, params_for, run_seed, summarise
from tessera.core.config import GenerateParams
from tessera.core.data.digits import RECORD_RATE, WORDS, _word_bank
from tessera.core.stages.prepare import prepare_data

INPUTS = {"image": "image", "speech": "audio"}
QUIET = Console(file=io.StringIO())


def degrade_scan(scan: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[8, 8] uint8 -> the same with Gaussian noise (sigma 40 of 255) and, half the time, a 4 x 4 block blanked."""
    x = scan.astype(np.float32) + rng.normal(0, 40, scan.shape)
    if rng.random() < 0.5:
        y0, x0 = rng.integers(0, 5, 2)
        x[y0:y0 + 4, x0:x0 + 4] = 0
    return np.clip(x, 0, 255).astype(np.uint8)


def degrade_word(word: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float32 [T] speech -> in white noise at -6 to +6 dB SNR, with up to 150 ms of silence either side."""
    pad = [np.zeros(int(rng.integers(0, RECORD_RATE * 0.15)), np.float32) for _ in range(2)]
    wave = np.concatenate([pad[0], word, pad[1]])
    noise = rng.normal(0, np.sqrt(np.mean(word ** 2)) * 10 ** (-rng.uniform(-6, 6) / 20), len(wave))
    wave = wave + noise.astype(np.float32)
    return np.clip(wave / max(np.abs(wave).max(), 1e-3) * 0.8, -1, 1)


def build(out: Path, seed: int = 0) -> None:
    """--out/records: train.csv and test.csv (image, speech, label) and their files."""
    cfg = GenerateParams()
    rng = np.random.default_rng(seed)
    digits = load_digits()
    scans = (digits.images * (255 / 16)).round().astype(np.uint8)
    idx = dict(zip(("train", "test"), train_test_split(np.arange(len(scans)), test_size=0.2, stratify=digits.target,
                                                       random_state=seed)))
    voices = {"train": list(cfg.train_voices), "test": list(cfg.test_voices)}
    bank = _word_bank(voices["train"] + voices["test"], rng)
    words = WORDS["en"].split()
    folder = out / "records"
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "speech").mkdir(exist_ok=True)
    for split, rows in idx.items():
        table = []
        for i in rows:
            d = int(digits.target[i])
            said = bank[voices[split][rng.integers(len(voices[split]))]][words[d]][rng.integers(2)]
            Image.fromarray(degrade_scan(scans[i], rng)).save(folder / "img" / f"{i:04d}.png")
            sf.write(folder / "speech" / f"{i:04d}.wav", degrade_word(said, rng), RECORD_RATE, subtype="PCM_16")
            table.append({"image": f"img/{i:04d}.png", "speech": f"speech/{i:04d}.wav", "label": str(d)})
        with open(folder / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["image", "speech", "label"], lineterminator="\n")
            writer.writeheader()
            writer.writerows(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=float, default=None, help="default: params.yaml's train.epochs")
    ap.add_argument("--remove", choices=list(INPUTS), nargs="+", default=list(INPUTS))
    ap.add_argument("--out", default="runs/avmnist")
    args = ap.parse_args()
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    base["model"].pop("inputs", None)  # the default grid's own settings: a scan here is one digit, as the image task's
    out = Path(args.out).resolve()
    if not (out / "records" / "train.csv").exists():
        build(out)
    t0 = time.time()
    prepare_data(params_for(base, out, out, args.remove, inputs=INPUTS), QUIET)
    prepare_s = round(time.time() - t0, 1)
    per_seed = {seed: run_seed(base, out, out, args.remove, seed, args.epochs, INPUTS) for seed in args.seeds}
    summarise(per_seed, args, prepare_s, out / "avmnist.json")


if __name__ == "__main__":
    main()
