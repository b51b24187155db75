"""Prompt templates and class-name lists for text classifiers, built in or read from files.

Built-in template sets (``TEMPLATE_SETS``):

- ``simple``: four short prompts, the default of ``finegrain eval`` and of evaluation during training.
- ``openai``: the 80 ImageNet prompts of the CLIP paper (as open_clip ships them).
- ``detailclip``: the 7-prompt ensemble DetailCLIP's ImageNet zero-shot uses (open_clip's "simple" set).
- ``vild``: the 63 ViLD-style prompts FineCLIP and CLIPSelf use for COCO box classification, with their
  rules: ``{article}`` is "an" before a vowel-initial class name and "a" otherwise, class names are
  cleaned (``_`` -> space, ``/`` -> " or ", lower case, trailing "." dropped), and "This is " is put before
  every prompt that starts with "a" or "the".

Built-in class-name lists (``class_name_set``): ``imagenet`` (open_clip's 1000 names in class index order,
which is the sorted order of the wnid folders, with two repeats made distinct: see ``IMAGENET_NAMES``) and
the lists shipped in ``eval/class_names/*.txt``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from open_clip.zero_shot_metadata import (
    IMAGENET_CLASSNAMES,
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
)

from ..errors import DataError, non_utf8_text

CLASS_NAMES_DIR = Path(__file__).parent / "class_names"
# open_clip's (OpenAI's) ImageNet names repeat "missile" (657, 744) and "sunglasses" (836, 837); a class is
# known by its name here, so the second missile (n04008634) and the first sunglasses (n04355933, a burning
# lens) take their WordNet names. CLIP_benchmark keeps the repeats (its argmax then never picks 744 or 837).
IMAGENET_NAMES = tuple({744: "projectile", 836: "sunglass"}.get(i, name)
                       for i, name in enumerate(IMAGENET_CLASSNAMES))


@dataclass(frozen=True)
class Templates:
    """Prompt templates: ``{}`` is the class name, ``{article}`` (optional) its indefinite article."""

    templates: tuple[str, ...]
    this_is_prefix: bool = False
    clean_names: bool = False

    def __post_init__(self):
        if not self.templates:
            raise DataError("need at least one prompt template")
        for template in self.templates:
            if "{}" not in template:
                raise DataError(f"prompt template {template!r} has no '{{}}' for the class name")

    def prompts(self, class_name: str) -> list[str]:
        """The prompts of one class, in template order."""
        name = _clean(class_name) if self.clean_names else class_name
        article = "an" if class_name[:1].lower() in "aeiou" else "a"
        texts = [template.format(name, article=article) for template in self.templates]
        if self.this_is_prefix:
            texts = ["This is " + text if text.startswith(("a", "the")) else text for text in texts]
        return texts


def _clean(name: str) -> str:
    return name.replace("_", " ").replace("/", " or ").lower().rstrip(".")


_VILD_TEMPLATES = (
    "There is {article} {} in the scene.", "There is the {} in the scene.", "a photo of {article} {} in the scene.",
    "a photo of the {} in the scene.", "a photo of one {} in the scene.",
    "itap of {article} {}.", "itap of my {}.", "itap of the {}.", "a photo of {article} {}.", "a photo of my {}.",
    "a photo of the {}.", "a photo of one {}.", "a photo of many {}.",
    "a good photo of {article} {}.", "a good photo of the {}.", "a bad photo of {article} {}.",
    "a bad photo of the {}.", "a photo of a nice {}.", "a photo of the nice {}.", "a photo of a cool {}.",
    "a photo of the cool {}.", "a photo of a weird {}.", "a photo of the weird {}.",
    "a photo of a small {}.", "a photo of the small {}.", "a photo of a large {}.", "a photo of the large {}.",
    "a photo of a clean {}.", "a photo of the clean {}.", "a photo of a dirty {}.", "a photo of the dirty {}.",
    "a bright photo of {article} {}.", "a bright photo of the {}.", "a dark photo of {article} {}.",
    "a dark photo of the {}.",
    "a photo of a hard to see {}.", "a photo of the hard to see {}.", "a low resolution photo of {article} {}.",
    "a low resolution photo of the {}.", "a cropped photo of {article} {}.", "a cropped photo of the {}.",
    "a close-up photo of {article} {}.", "a close-up photo of the {}.",
    "a jpeg corrupted photo of {article} {}.", "a jpeg corrupted photo of the {}.",
    "a blurry photo of {article} {}.", "a blurry photo of the {}.", "a pixelated photo of {article} {}.",
    "a pixelated photo of the {}.",
    "a black and white photo of the {}.", "a black and white photo of {article} {}.",
    "a plastic {}.", "the plastic {}.", "a toy {}.", "the toy {}.", "a plushie {}.", "the plushie {}.",
    "a cartoon {}.", "the cartoon {}.", "an embroidered {}.", "the embroidered {}.",
    "a painting of the {}.", "a painting of a {}.",
)

TEMPLATE_SETS: dict[str, Templates] = {
    "simple": Templates(("a photo of a {}.", "a photo of the {}.", "a close-up photo of a {}.",
                         "a {} in the scene.")),
    "openai": Templates(tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)),
    "detailclip": Templates(tuple(template("{}") for template in SIMPLE_IMAGENET_TEMPLATES)),
    "vild": Templates(_VILD_TEMPLATES, this_is_prefix=True, clean_names=True),
}


def _read_list(path: Path, what: str, dataset: str | None) -> list[str]:
    """Lines of a text file, or a JSON list, or a JSON object keyed by dataset name (CLIP_benchmark's
    ``--custom_classname_file`` / ``--custom_template_file`` layout) -> list of strings."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading byte-order mark is not part of the first name
    except OSError as e:
        raise DataError(f"cannot read the {what} file {path}: {e}") from e
    except UnicodeDecodeError as e:
        data = path.read_bytes()
        line, problem = non_utf8_text(data, e)
        raise DataError(f"{path}:{line}: {problem}") from None
    if path.suffix != ".json":
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if isinstance(data, dict):
        if dataset is None or dataset not in data:
            raise DataError(f"{path}: a {what} object keyed by dataset name needs a dataset that is one of its "
                            f"keys {sorted(data)[:10]}, got {dataset!r}")
        data = data[dataset]
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise DataError(f"{path}: expected a JSON list of strings for the {what}")
    return data


def load_templates(spec: str | Sequence[str] | Templates, dataset: str | None = None) -> Templates:
    """A :class:`Templates` from a built-in set name (``TEMPLATE_SETS``), a file (one template per line, a
    JSON list, or a JSON object keyed by ``dataset``), or a list of template strings."""
    if isinstance(spec, Templates):
        return spec
    if not isinstance(spec, str):
        return Templates(tuple(spec))
    if spec in TEMPLATE_SETS:
        return TEMPLATE_SETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"templates {spec!r} is neither a built-in set {sorted(TEMPLATE_SETS)} nor a file")
    # CLIP_benchmark's files write the class name as {c}
    return Templates(tuple(t.replace("{c}", "{}") for t in _read_list(path, "templates", dataset)))


def class_name_sets() -> list[str]:
    """Names of the built-in class-name lists."""
    return sorted(["imagenet", *(p.stem for p in CLASS_NAMES_DIR.glob("*.txt"))])


def load_class_names(spec: str | Sequence[str], dataset: str | None = None) -> list[str]:
    """Class names from a built-in list name (:func:`class_name_sets`), a file (one per line, a JSON list,
    or a JSON object keyed by ``dataset``), or a list of strings; they must be distinct."""
    if not isinstance(spec, str):
        names = list(spec)
    elif spec == "imagenet":
        names = list(IMAGENET_NAMES)
    elif (CLASS_NAMES_DIR / f"{spec}.txt").is_file():
        names = _read_list(CLASS_NAMES_DIR / f"{spec}.txt", "class names", None)
    elif Path(spec).is_file():
        names = _read_list(Path(spec), "class names", dataset)
    else:
        raise DataError(f"class names {spec!r} are neither a built-in list {class_name_sets()} nor a file")
    if not names:
        raise DataError(f"class names {spec!r}: the list is empty")
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise DataError(f"class names {spec!r} must be distinct; repeated: {repeated[:5]}")
    return names
