"""The embedded default dataset: trimodal digits, generated offline from pip-installed packages alone.

- images: scikit-learn's 1,797 handwritten digit scans (8 x 8), as PNG files in ImageFolder layout;
- audio: digits spoken by eSpeak NG (espeakng-loader's libespeak-ng, through ctypes) in several languages,
  voices, rates and pitches, with mild noise; 22,050 Hz int16 WAV files and CSV manifests (path, label, voice);
- text: sentences naming a digit in several languages and templates, as JSONL (text, label);
- detection: 64 x 64 canvases holding 1 to 4 digit scans at random positions and scales, COCO JSON;
- records: a table (CSV) of samples with three inputs each: a 16 x 16 image, a 2 x 2 grid of scans of 1-4 distinct
  digits in reading order; its caption naming the digits in order ("three, five and seven"); and that caption spoken
  (16 kHz WAV).
  Each input may hide one digit (an occluded cell, a word replaced by "something", a word drowned in noise), never
  the same digit as another input, and the target is the digits' sum: no input alone answers every record, any two
  together do (`_write_records`).

The label (the digit) links the modalities. Test splits measure generalisation: held-out voices, held-out
sentence templates, canvases built from held-out scans, and a stratified held-out share of the scans.
Everything follows from `seed`: the same seed writes the same bytes.
"""

from __future__ import annotations

import csv
import ctypes
import functools
import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image
from rich.console import Console
from rich.progress import track
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from tessera.core.config import GenerateParams, Params
from tessera.core.data.files import atomic_write_text
from tessera.core.errors import UserError
from tessera.core.units import Unit, plain

WORDS = {
    "en": "zero one two three four five six seven eight nine",
    "de": "null eins zwei drei vier fünf sechs sieben acht neun",
    "fr": "zéro un deux trois quatre cinq six sept huit neuf",
    "es": "cero uno dos tres cuatro cinco seis siete ocho nueve",
    "it": "zero uno due tre quattro cinque sei sette otto nove",
    "nl": "nul een twee drie vier vijf zes zeven acht negen",
}
# {d}: the digit's word; {n}: a noun. The last template of each language is held out for the test split.
TEMPLATES = {
    "en": ["the number is {d}", "i can see {d} {n} here", "{d}", "please write down {d}", "my lucky digit is {d}",
           "she counted {d} {n} in the garden"],
    "de": ["die zahl ist {d}", "ich sehe {d} {n}", "{d}", "bitte schreib {d} auf", "meine glückszahl ist {d}",
           "sie zählte {d} {n} im garten"],
    "fr": ["le nombre est {d}", "je vois {d} {n}", "{d}", "écris {d} s'il te plaît", "mon chiffre porte-bonheur est {d}",
           "elle a compté {d} {n} dans le jardin"],
    "es": ["el número es {d}", "veo {d} {n}", "{d}", "por favor escribe {d}", "mi dígito de la suerte es {d}",
           "ella contó {d} {n} en el jardín"],
    "it": ["il numero è {d}", "vedo {d} {n}", "{d}", "per favore scrivi {d}", "la mia cifra fortunata è {d}",
           "lei ha contato {d} {n} nel giardino"],
    "nl": ["het getal is {d}", "ik zie {d} {n}", "{d}", "schrijf {d} op alsjeblieft", "mijn geluksgetal is {d}",
           "zij telde {d} {n} in de tuin"],
}
NOUNS = {
    "en": ["cats", "apples", "birds", "stars", "boats"], "de": ["katzen", "äpfel", "vögel", "sterne", "boote"],
    "fr": ["chats", "pommes", "oiseaux", "étoiles", "bateaux"], "es": ["gatos", "manzanas", "pájaros", "estrellas", "barcos"],
    "it": ["gatti", "mele", "uccelli", "stelle", "barche"], "nl": ["katten", "appels", "vogels", "sterren", "boten"],
}
# Words that carry no digit: training sentences get 0-3 of them before and after the template, so that the
# digit's word sits anywhere and a model must find it rather than memorise each template's layout.
FILLERS = {
    "en": "well so okay look today really maybe again now yes please",
    "de": "also gut heute wirklich vielleicht schau jetzt ja bitte nun",
    "fr": "alors bon aujourd'hui vraiment peut-être regarde maintenant oui voilà donc",
    "es": "bueno pues hoy realmente quizás mira ahora sí vale entonces",
    "it": "allora bene oggi davvero forse guarda adesso sì ecco dunque",
    "nl": "nou goed vandaag echt misschien kijk nu ja toch dus",
}
SAMPLE_RATE = 22050  # what libespeak-ng produces in retrieval mode
RECORD_RATE = 16000  # records' speech: model.audio.sample_rate, so prepare does not resample it
RECORD_SECONDS = 1.25  # longest spoken caption: model.audio.max_frames (128) x hop_length (160) is 1.28 s at 16 kHz
HIDE = 0.75  # the chance that each input of a record hides one digit (while a digit no other input hides is left)
HIDDEN_WORD = "something"


class Speaker:
    """libespeak-ng in retrieval mode: text -> int16 samples at `sample_rate` (22,050 Hz).

    The library is process-global and hangs if initialised twice: get the one instance with `speaker()`.
    """

    _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def __init__(self):
        import espeakng_loader

        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._chunks: list[np.ndarray] = []
        self._callback = self._CALLBACK(self._collect)  # held on self: the library keeps only the pointer
        self.sample_rate = self._lib.espeak_Initialize(1, 0, espeakng_loader.get_data_path().encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError("libespeak-ng failed to initialise; reinstall espeakng-loader")
        self._lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, _events):
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def say(self, text: str, voice: str, rate: int, pitch: int, seed: int = 0) -> np.ndarray:
        """int16 samples. `seed` fixes the breath noise of some voices (eSpeak seeds it from the clock)."""
        self._lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"eSpeak NG has no voice {voice!r}")
        self._lib.espeak_SetParameter(1, rate, 0)  # espeakRATE, words per minute
        self._lib.espeak_SetParameter(3, pitch, 0)  # espeakPITCH, 0-100
        self._chunks.clear()
        data = text.encode()
        self._lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 0, None, None)  # POS_CHARACTER, espeakCHARS_AUTO
        self._lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


@functools.cache
def speaker() -> Speaker:
    return Speaker()


def _write_images(out: Path, cfg: GenerateParams) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    scans = (digits.images * (255 / 16)).round().astype(np.uint8)  # [1797, 8, 8], 0-16 -> 0-255
    idx_train, idx_test = train_test_split(np.arange(len(scans)), test_size=cfg.image_test_fraction,
                                           stratify=digits.target, random_state=cfg.seed)
    for split, idx in (("train", idx_train), ("test", idx_test)):
        for i in idx:
            folder = out / "images" / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(scans[i]).save(folder / f"{i:04d}.png")
    return scans[idx_train], digits.target[idx_train], scans[idx_test], digits.target[idx_test]


def _speak(jobs: list[tuple[str, str, int, int, int]]) -> list[np.ndarray]:
    """Synthesise (text, voice, rate, pitch, seed) jobs in order. Runs in a fresh process: eSpeak keeps state
    between utterances, so each batch must start from the same state for the bytes to repeat."""
    return [speaker().say(*job) for job in jobs]


def _write_audio(out: Path, cfg: GenerateParams, rng: np.random.Generator) -> None:
    (out / "audio" / "wav").mkdir(parents=True)
    clips = [(split, lang, voice, d, take, int(rng.integers(120, 221)), int(rng.integers(25, 76)), int(rng.integers(2**31)))
             for split, voices, takes in (("train", cfg.train_voices, cfg.audio_takes), ("test", cfg.test_voices, 1))
             for lang in cfg.languages for voice in voices for d in range(10) for take in range(takes)]
    by_lang = [[(WORDS[lang].split()[d], lang + voice, rate, pitch, seed)
                for _, lg, voice, d, _, rate, pitch, seed in clips if lg == lang] for lang in cfg.languages]
    # One fresh process per language; an executor, unlike multiprocessing.Pool, fails instead of waiting
    # forever when a worker dies.
    with ProcessPoolExecutor(min(2, len(by_lang)), mp_context=multiprocessing.get_context("spawn"),
                             max_tasks_per_child=1) as pool:
        spoken = dict(zip(cfg.languages, track(pool.map(_speak, by_lang), total=len(by_lang),
                                               description="speaking digits")))
    rows = {"train": [], "test": []}
    next_clip = {lang: iter(waves) for lang, waves in spoken.items()}
    for split, lang, voice, d, take, rate, pitch, _ in clips:
        wave = next(next_clip[lang]).astype(np.float32) / 32768
        wave = wave / max(np.abs(wave).max(initial=0.0), 1e-3) * rng.uniform(0.3, 0.9)  # random loudness
        wave = wave + rng.normal(0, 10 ** rng.uniform(-3.5, -2.5), len(wave)).astype(np.float32)  # mild noise
        name = f"wav/{lang}{voice.replace('+', '_')}_{d}_{take}.wav"
        sf.write(out / "audio" / name, np.clip(wave, -1, 1), SAMPLE_RATE, subtype="PCM_16")
        rows[split].append({"path": name, "label": str(d), "voice": lang + voice})
    for split, split_rows in rows.items():
        with open(out / "audio" / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["path", "label", "voice"], lineterminator="\n")
            writer.writeheader()
            writer.writerows(split_rows)


def _write_text(out: Path, cfg: GenerateParams, rng: np.random.Generator) -> None:
    (out / "text").mkdir(parents=True)
    for split, count in zip(("train", "test"), cfg.text_per_split):
        with open(out / "text" / f"{split}.jsonl", "w") as f:
            for _ in range(count):
                lang = cfg.languages[rng.integers(len(cfg.languages))]
                templates = TEMPLATES[lang][:-1] if split == "train" else TEMPLATES[lang][-1:]
                d = int(rng.integers(10))
                noun = NOUNS[lang][rng.integers(len(NOUNS[lang]))]
                text = templates[rng.integers(len(templates))].format(d=WORDS[lang].split()[d], n=noun)
                if split == "train":
                    fillers = FILLERS[lang].split()
                    before, after = (list(rng.choice(fillers, int(rng.integers(0, 4)))) for _ in range(2))
                    text = " ".join(before + [text] + after)
                f.write(json.dumps({"text": text, "label": str(d)}, ensure_ascii=False) + "\n")


def _write_detection(out: Path, cfg: GenerateParams, rng: np.random.Generator, splits: dict) -> None:
    """Canvases of 1-4 non-overlapping scans, each scaled to 14-26 px; boxes are tight around the ink."""
    S = cfg.canvas_size
    (out / "detection" / "images").mkdir(parents=True)
    categories = [{"id": d + 1, "name": str(d)} for d in range(10)]
    for split, count in zip(("train", "test"), cfg.detection_per_split):
        scans, labels = splits[split]
        images, annotations = [], []
        for img_id in range(count):
            canvas = np.zeros((S, S), np.uint8)
            placed: list[tuple[int, int, int, int]] = []
            for _ in range(int(rng.integers(1, 5))):
                k = int(rng.integers(len(scans)))
                size = int(rng.integers(14, 27))
                for _try in range(20):
                    x, y = int(rng.integers(0, S - size + 1)), int(rng.integers(0, S - size + 1))
                    if all(x + size <= px or px + ps <= x or y + size <= py or py + ps <= y for px, py, ps, _ in placed):
                        break
                else:
                    continue
                patch = np.asarray(Image.fromarray(scans[k]).resize((size, size), Image.BILINEAR))
                canvas[y:y + size, x:x + size] = patch
                placed.append((x, y, size, int(labels[k])))
                ys, xs = np.nonzero(patch > 32)
                bbox = [x + int(xs.min()), y + int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
                annotations.append({"id": len(annotations) + 1, "image_id": img_id + 1, "category_id": int(labels[k]) + 1,
                                    "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
            file_name = f"{split}_{img_id:05d}.png"
            Image.fromarray(canvas).save(out / "detection" / "images" / file_name)
            images.append({"id": img_id + 1, "file_name": f"images/{file_name}", "width": S, "height": S})
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (out / "detection" / f"{split}.json").write_text(json.dumps(coco, indent=1))


def caption(words: list[str]) -> str:
    """["three", "five", "seven"] -> "three, five and seven"."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _word_bank(voices: list[str], rng: np.random.Generator) -> dict[str, dict[str, list[np.ndarray]]]:
    """Voice -> every digit word and "and" -> two renditions at 300-400 words a minute: float32 [T] at RECORD_RATE,
    silence trimmed. Records' speech is put together from these words, so that one word can be drowned alone."""
    import soxr

    words = WORDS["en"].split() + ["and"]
    jobs = [(w, "en" + v, int(rng.integers(300, 401)), int(rng.integers(25, 76)), int(rng.integers(2**31)))
            for v in voices for _take in range(2) for w in words]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        spoken = iter(pool.submit(_speak, jobs).result())
    bank = {}
    for v in voices:
        said: dict[str, list[np.ndarray]] = {w: [] for w in words}
        for _take in range(2):
            for w in words:
                wave = soxr.resample(next(spoken).astype(np.float32) / 32768, SAMPLE_RATE, RECORD_RATE)
                loud = np.nonzero(np.abs(wave) > 0.05 * np.abs(wave).max(initial=1e-3))[0]
                said[w].append(wave[loud.min():loud.max() + 1] if len(loud) else wave)
        bank[v] = said
    return bank


def _speech(words: list[str], hidden: int | None, said: dict[str, list[np.ndarray]], rng: np.random.Generator) -> np.ndarray:
    """The caption of digit `words` spoken (float32 [T], T <= RECORD_SECONDS at RECORD_RATE): the words with short gaps,
    word `hidden` drowned in loud noise, the whole in mild noise, sped up to fit where it is too long."""
    import soxr

    parts = []
    for k, w in enumerate(words):
        if k and k == len(words) - 1:
            parts.append(said["and"][rng.integers(2)])
        wave = said[w][rng.integers(2)]
        if k == hidden:  # white noise 3-6x the word's RMS: the word cannot be heard, its length still can
            wave = rng.normal(0, rng.uniform(3, 6) * np.sqrt(np.mean(wave ** 2)), len(wave)).astype(np.float32)
        parts.append(wave)
    gaps = [np.zeros(int(rng.integers(320, 960)), np.float32) for _ in parts]  # 20-60 ms
    wave = np.concatenate([x for part, gap in zip(parts, gaps) for x in (part, gap)])
    if len(wave) > RECORD_SECONDS * RECORD_RATE:  # speed up (and raise the pitch) rather than cut a word
        wave = soxr.resample(wave, len(wave), int(RECORD_SECONDS * RECORD_RATE) - 1)[:int(RECORD_SECONDS * RECORD_RATE)]
    wave = wave / max(np.abs(wave).max(initial=0.0), 1e-3) * rng.uniform(0.3, 0.8)
    return np.clip(wave + rng.normal(0, 10 ** rng.uniform(-2.5, -1.8), len(wave)).astype(np.float32), -1, 1)


def _write_records(out: Path, cfg: GenerateParams, rng: np.random.Generator, splits: dict) -> None:
    """records/<split>.csv (image, caption, speech, label) with the files it names. A record holds 1-4 distinct
    digits, each input hides at most one (with chance HIDE) and no two inputs hide the same one, so any two inputs
    together name every digit; the label is their sum (0-30). Test records use held-out scans and held-out voices."""
    folder = out / "records"
    (folder / "img").mkdir(parents=True)
    (folder / "speech").mkdir()
    words = WORDS["en"].split()
    bank = _word_bank(list(cfg.train_voices) + list(cfg.test_voices), rng)
    for (split, voices), count in zip((("train", cfg.train_voices), ("test", cfg.test_voices)), cfg.records_per_split):
        scans, labels = splits[split]
        by_digit = [np.flatnonzero(labels == d) for d in range(10)]
        rows = []
        for i in range(count):
            # distinct digits: a model can add up the union of what its inputs show without first matching
            # each caption word to its cell and its stretch of speech (with repeats it must, to count them)
            digits = rng.choice(10, size=int(rng.integers(1, 5)), replace=False)
            positions, hidden = iter(rng.permutation(len(digits))), {}
            for name in rng.permutation(["image", "caption", "speech"]):  # who may hide first, at random
                k = next(positions, None) if rng.random() < HIDE else None
                if k is not None:
                    hidden[str(name)] = int(k)
            grid = np.zeros((16, 16), np.uint8)  # cells in reading order; a record of n digits fills the first n
            for k, d in enumerate(digits):
                cell = rng.integers(64, 192, (8, 8)) if hidden.get("image") == k else scans[rng.choice(by_digit[d])]
                grid[k // 2 * 8:k // 2 * 8 + 8, k % 2 * 8:k % 2 * 8 + 8] = cell
            named = [HIDDEN_WORD if hidden.get("caption") == k else words[d] for k, d in enumerate(digits)]
            wave = _speech([words[d] for d in digits], hidden.get("speech"), bank[voices[rng.integers(len(voices))]], rng)
            Image.fromarray(grid).save(folder / "img" / f"{split}_{i:05d}.png")
            sf.write(folder / "speech" / f"{split}_{i:05d}.wav", wave, RECORD_RATE, subtype="PCM_16")
            rows.append({"image": f"img/{split}_{i:05d}.png", "caption": caption(named),
                         "speech": f"speech/{split}_{i:05d}.wav", "label": str(int(digits.sum()))})
        with open(folder / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["image", "caption", "speech", "label"], lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)


def generate(cfg: GenerateParams, unit: Unit = plain) -> dict:
    """Write the default dataset under `cfg.out` (replacing it whole, atomically), a unit of work per modality.
    Returns sample counts."""
    unknown = set(cfg.languages) - set(WORDS)
    if unknown:
        raise UserError(f"params.yaml: generate.languages: {sorted(unknown)} have no digit words; known: {sorted(WORDS)}")
    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(cfg.seed)
    train_x, train_y, test_x, test_y = unit("generate images", _write_images, tmp, cfg)
    unit("generate audio", _write_audio, tmp, cfg, rng)
    unit("generate text", _write_text, tmp, cfg, rng)
    splits = {"train": (train_x, train_y), "test": (test_x, test_y)}
    unit("generate detection", _write_detection, tmp, cfg, rng, splits)
    unit("generate records", _write_records, tmp, cfg, rng, splits)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    clips_per_voice = len(cfg.languages) * 10
    return {"images": {"train": len(train_y), "test": len(test_y)},
            "audio": {"train": len(cfg.train_voices) * clips_per_voice * cfg.audio_takes,
                      "test": len(cfg.test_voices) * clips_per_voice},
            "text": dict(zip(("train", "test"), cfg.text_per_split)),
            "detection": dict(zip(("train", "test"), cfg.detection_per_split)),
            "records": dict(zip(("train", "test"), cfg.records_per_split))}


def write_unused_note(out: str | Path, root: str) -> None:
    """In place of the default dataset, when prepare.root holds the user's data: a note (DVC wants the stage's
    output to exist), and none of the 30 s and 40 MB that generating it costs."""
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    atomic_write_text(out / "NOT_GENERATED.md", f"The default dataset is not in use: prepare.root is {root}. Point "
                      "prepare.root and prepare.sources back at this folder to generate and use it.\n")


def generate_default_data(params: Params, console: Console | None = None, unit: Unit = plain) -> dict:
    """The generate stage: the default dataset when a source reads it (sample counts), else only the note ({})."""
    console = console or Console()
    if not params.uses_default_data():
        write_unused_note(params.generate.out, params.prepare.root)
        console.print("prepare.root holds other data: the default dataset is not in use, not generated")
        return {}
    counts = generate(params.generate, unit)
    console.print(", ".join(f"{m} {c['train']}+{c['test']}" for m, c in counts.items()))
    return counts
