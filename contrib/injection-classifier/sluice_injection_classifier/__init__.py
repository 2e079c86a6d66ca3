"""A third-party detector for Sluice's injection plugin: a text classifier, scores combined with the signatures.

Install (``pip install ./contrib/injection-classifier``) and name it in the plugin's config::

    - injection:
        detectors:
          - use: signatures
          - use: classifier            # from the sluice.injection_detectors entry point
            weight: 0.8
            options: {backend: tiny}   # or {backend: transformers, model_path: /models/my-injection-model}

Without installing, ``use: sluice_injection_classifier:ClassifierDetector`` works too
when the package is importable. Neither the core nor the plugin changes.

Backends:

* ``tiny`` (default): the bundled :class:`~sluice_injection_classifier.tiny.TinyScorer`,
  or your own weights with ``model_file``. No dependencies; a demonstration, not a defence.
* ``transformers``: a local Hugging Face text-classification model directory you
  provide (``model_path``); needs the ``transformers`` extra. Loaded with
  ``local_files_only``: nothing is downloaded, ever.
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from pathlib import Path
from typing import Any, Mapping

from plugins.injection import Detection, Detector

from .tiny import TinyScorer

__all__ = ["ClassifierDetector", "TinyScorer"]

BUNDLED = Path(__file__).with_name("data") / "tiny_model.json"
_OPTIONS = {"backend", "model_file", "model_path", "injection_labels", "max_chars", "category"}


class ClassifierDetector(Detector):
    name = "classifier"
    # a model is too slow for the event loop: the plugin runs detect() in its executor
    blocking = True

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ValueError(f"unknown options: {', '.join(sorted(unknown))}")
        self.backend = options.get("backend", "tiny")
        if self.backend not in ("tiny", "transformers"):
            raise ValueError("backend must be 'tiny' or 'transformers'")
        self.model_file = Path(options.get("model_file") or BUNDLED)
        self.model_path = options.get("model_path")
        if self.backend == "transformers" and not self.model_path:
            raise ValueError("the transformers backend needs 'model_path' (a local model directory)")
        self.labels = {str(x).lower() for x in options.get("injection_labels", ("injection", "jailbreak", "label_1", "unsafe"))}
        self.max_chars = int(options.get("max_chars", 4000))
        if self.max_chars < 1:
            raise ValueError("max_chars must be at least 1")
        self.category = str(options.get("category", "classifier"))
        self._scorer: TinyScorer | None = None
        self._pipe: Any = None
        self._lock = threading.Lock()
        self._version = "unloaded"

    @property
    def version(self) -> str:
        return self._version

    def start(self) -> None:
        if self.backend == "tiny":
            self._scorer = TinyScorer.load(self.model_file)
            self._version = "tiny-" + hashlib.sha256(self.model_file.read_bytes()).hexdigest()[:12]
            return
        if importlib.util.find_spec("transformers") is None:
            raise RuntimeError("the transformers backend needs: pip install 'sluice-injection-classifier[transformers]'")
        path = Path(str(self.model_path))
        if not path.is_dir():
            raise RuntimeError(f"model_path {path} is not a local directory")
        from transformers import pipeline  # heavy: imported only when this backend starts

        self._pipe = pipeline("text-classification", model=str(path), tokenizer=str(path), device=-1, local_files_only=True, top_k=None)
        self._version = f"transformers-{path.name}"

    def stop(self) -> None:
        self._scorer = None
        self._pipe = None

    def detect(self, text: str, source: Any) -> Detection:
        # a long document is classified by its head and tail: where injected text usually sits
        if len(text) > self.max_chars:
            half = self.max_chars // 2
            text = text[:half] + "\n" + text[-half:]
        if self._scorer is not None:
            score = self._scorer.score(text)
        elif self._pipe is not None:
            with self._lock:  # tokenizers are not guaranteed thread-safe
                out = self._pipe(text, truncation=True)
            rows = out[0] if out and isinstance(out[0], list) else out
            score = max((float(r["score"]) for r in rows if str(r["label"]).lower() in self.labels), default=0.0)
        else:
            raise RuntimeError("ClassifierDetector.detect() called before start()")
        score = round(score, 4)
        return Detection(score, {self.category: score} if score > 0 else {}, (f"{self.name}:{self.backend}",) if score > 0 else ())
