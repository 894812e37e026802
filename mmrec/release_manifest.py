"""The release manifest (manifest.json) as typed records: one codec for its writer and every reader.

`mmrec export`, `mmrec tune` and `mmrec admission` write it (through
`mmrec.export.manifest.write_manifest`); the export summary, the report, admission and the
benchmarks read it. It lives in the contract layer (beside `RepositoryLayout`, which loads it)
so that every reader can import it without torch or the export stack.

Each record types what code reads and keeps the rest as it came:

* keys a record does not know go to its `extra` and are written back, so a newer manifest read
  (and rewritten, e.g. by `mmrec admission`) by older code is not silently truncated;
* an optional key that is absent stays absent on write (None means absent; an explicit null is
  kept as it was), so `Manifest.from_dict(d).to_dict() == d` for every manifest an export wrote,
  old ones included, and a rewrite changes no bytes it did not mean to;
* sections that are only written and displayed (training metrics, gate details, timing tables,
  the admission record) stay plain dicts inside their record.

A required key that is missing or null, or a value of the wrong kind, is a `ManifestError`
naming it (all the missing keys of a record at once).
"""
from __future__ import annotations

import copy
import json
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, overload

from mmrec.model_repository.lib.served_contract import ServedContract

MANIFEST_FILE = "manifest.json"
FORMAT = 1  # manifest.json's `format`: bump when a reader of the old layout would misread the new

R = TypeVar("R", bound="Record")


class ManifestError(ValueError):
    """manifest.json lacks a key this code needs, or holds the wrong kind of value under one."""


# ---- codecs: how one field's JSON value becomes its typed value and back ------------------------

class _Plain:
    """JSON kept as it is (copied, so a record never shares a list or dict with its source)."""

    def decode(self, value: Any, where: str) -> Any:
        return copy.deepcopy(value)

    def encode(self, value: Any) -> Any:
        return copy.deepcopy(value)


@dataclass(frozen=True)
class _Scalar(_Plain):
    """A JSON value of the given kinds (string, number, flag, or an object or list kept as it
    is), checked for its kind."""

    kinds: tuple[type, ...]

    def decode(self, value: Any, where: str) -> Any:
        return copy.deepcopy(_expect(value, self.kinds, where))


@dataclass(frozen=True)
class _Nested:
    record: type[Record]

    def decode(self, value: Any, where: str) -> Record:
        return self.record.from_dict(value, where)

    def encode(self, value: Record) -> dict:
        return value.to_dict()


@dataclass(frozen=True)
class _DictOf:
    """An object of records by name; its key order is kept (the summary lists them in it)."""

    item: _Nested

    def decode(self, value: Any, where: str) -> dict:
        return {k: self.item.decode(v, f"{where}.{k}") for k, v in _expect(value, (dict,), where).items()}

    def encode(self, value: dict) -> dict:
        return {k: self.item.encode(v) for k, v in value.items()}


@dataclass(frozen=True)
class _ListOf:
    item: _Nested

    def decode(self, value: Any, where: str) -> list:
        return [self.item.decode(v, f"{where}[{i}]") for i, v in enumerate(_expect(value, (list,), where))]

    def encode(self, value: list) -> list:
        return [self.item.encode(v) for v in value]


_PLAIN = _Plain()
_STR = _Scalar((str,))
_INT = _Scalar((int,))
_BOOL = _Scalar((bool,))
_OBJECT = _Scalar((dict,))
_LIST = _Scalar((list, tuple))


def _expect(value: Any, kinds: tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # True is an int
        names = " or ".join("object" if k is dict else "list" if k is list else k.__name__
                            for k in kinds if k is not tuple)
        raise ManifestError(f"`{where}` must be {names}, got {type(value).__name__} {value!r:.60}")
    return value


def _key(codec: Any = _PLAIN, *, required: bool = False, nullable: bool = False, **default: Any) -> Any:
    """A field stored under its own name. Required: the key must be there on read and is always
    written, null only where `nullable` (like `build.commit` outside a checkout); optional: None
    means absent, and it is written only when set. `default` (required fields only) is for
    building a record in code, never for filling a missing key on read."""
    if not required:
        default = {"default": None}
    return field(metadata={"codec": codec, "required": required, "nullable": nullable}, **default)


def _fields(cls: type) -> tuple[Field, ...]:
    return tuple(f for f in fields(cls) if f.name != "extra")


@dataclass(kw_only=True)
class Record:
    """Base of the manifest's records: `from_dict` / `to_dict` from their fields' metadata."""

    extra: dict[str, Any] = field(default_factory=dict)  # keys this code does not know, kept for the write

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any], where: str = "") -> R:
        _expect(data, (dict,), where or "manifest")
        values: dict[str, Any] = {}
        missing = [f"`{where}.{f.name}`" if where else f"`{f.name}`" for f in _fields(cls)
                   if f.metadata["required"] and f.name not in data]
        if missing:
            raise ManifestError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing from the manifest")
        for f in _fields(cls):
            path = f"{where}.{f.name}" if where else f.name
            if f.name not in data:
                continue
            raw = data[f.name]
            if raw is None:
                if f.metadata["nullable"]:
                    values[f.name] = None
                elif f.metadata["required"]:
                    raise ManifestError(f"`{path}` is null")
                continue  # an optional key written as null: kept in extra, as it came
            values[f.name] = f.metadata["codec"].decode(raw, path)
        record = cls(**values, extra={k: copy.deepcopy(v) for k, v in data.items() if k not in values})
        record._check(where)
        return record

    @classmethod
    def of(cls: type[R], value: R | Mapping[str, Any]) -> R:
        """`value` itself when it is already this record, else the record read from a dict (the
        form writers that still build dicts hand over)."""
        return value if isinstance(value, cls) else cls.from_dict(value)

    def to_dict(self) -> dict[str, Any]:
        out = copy.deepcopy(self.extra)
        for f in _fields(type(self)):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = f.metadata["codec"].encode(value)
            elif f.metadata["required"]:
                out[f.name] = None
        return out

    def _check(self, where: str) -> None:
        """Consistency across fields, after reading (a hook; most records have none)."""


# ---- the records --------------------------------------------------------------------------------

@dataclass(kw_only=True)
class FileEntry(Record):
    """A file of the repository: path relative to its root, hash and size."""

    path: str = _key(_STR, required=True)
    sha256: str = _key(_STR, required=True)
    bytes: int = _key(_INT, required=True)


@dataclass(kw_only=True)
class VariantRecord(Record):
    """One variant of a member (`model_repository/lib/runtime.py` names them): the graph and the
    runtime and precision it runs with, its file, and its verdicts (parity for FP32, a quality
    gate against FP32 for the others). A TensorRT plan records only `written` and `gate`."""

    written: bool | None = _key(_BOOL)  # built and admitted (gate passed); False: left out
    graph: str | None = _key(_STR)  # the ONNX graph it runs: fp32, int8, fp16 (several runtimes share one)
    runtime: str | None = _key(_STR)
    precision: str | None = _key(_STR)
    path: str | None = _key(_STR)  # its file, relative to the repository root (admitted variants)
    sha256: str | None = _key(_STR)
    bytes: int | None = _key(_INT)
    skipped: str | None = _key(_STR)  # why it was not built on the export machine (runtime absent)
    gate: dict[str, Any] | None = _key(_OBJECT)  # export.variants.GateResult.to_dict()
    parity: dict[str, Any] | None = _key(_OBJECT)  # FP32 graph vs PyTorch: atol and each case's error

    @property
    def left_out(self) -> bool:
        """Built and refused by its gate, or not built at all (not merely unrecorded)."""
        return self.written is False

    @property
    def gate_reasons(self) -> list[str]:
        """Why its gate refused it ([] without a gate or when it passed)."""
        return list((self.gate or {}).get("reasons", []))

    def set_file(self, entry: FileEntry) -> None:
        """Point the variant at a file of the repository (path, hash and size)."""
        self.path, self.sha256, self.bytes = entry.path, entry.sha256, entry.bytes


@dataclass(kw_only=True)
class MemberRecord(Record):
    """A member model (text_encoder, image_encoder, fusion, scorer): its variants by name, in the
    order export recorded them, and the one its config serves."""

    served_variant: str = _key(_STR, required=True)
    variants: dict[str, VariantRecord] = _key(_DictOf(_Nested(VariantRecord)), required=True,
                                              default_factory=dict)

    @property
    def served(self) -> VariantRecord:
        if self.served_variant not in self.variants:
            raise ManifestError(f"served variant {self.served_variant!r} is not among the recorded "
                                f"variants {sorted(self.variants)}")
        return self.variants[self.served_variant]

    def add(self, name: str, variant: VariantRecord) -> VariantRecord:
        """Record (or replace) a variant; returns it, to fill in as its build goes on."""
        self.variants[name] = variant
        return variant

    def serve(self, name: str) -> VariantRecord:
        """Make a recorded variant the served one."""
        if name not in self.variants:
            raise ManifestError(f"cannot serve {name!r}: not among the recorded variants {sorted(self.variants)}")
        self.served_variant = name
        return self.variants[name]

    def _check(self, where: str) -> None:
        if self.served_variant not in self.variants:
            raise ManifestError(f"`{where}.served_variant` is {self.served_variant!r}, which is not among "
                                f"its variants {sorted(self.variants)}")


@dataclass(kw_only=True)
class BuildIdentity(Record):
    """The source tree that built the repository (`mmrec.machine.git_commit`); both None where
    it was no checkout."""

    commit: str | None = _key(_STR, required=True, nullable=True)
    dirty: bool | None = _key(_BOOL, required=True, nullable=True)


@dataclass(kw_only=True)
class InputSource(Record):
    """Where a pretrained input came from: its package, version and file, and its hash."""

    sha256: str = _key(_STR, required=True)
    name: str | None = _key(_STR)  # the image encoder's architecture (`--image-encoder`)
    file: str | None = _key(_STR)
    package: str | None = _key(_STR)
    package_path: str | None = _key(_STR)  # the file within its installed package
    version: str | None = _key(_STR)
    # absolute paths on the export machine, written before sources were named by package: read
    # where they still exist on this machine
    path: str | None = _key(_STR)  # the text model's folder
    weights: str | None = _key(_STR)  # the image encoder's weights file


@dataclass(kw_only=True)
class DatasetRecord(Record):
    """The captioned items the fusion head was trained and judged on, and its split."""

    sha256: str = _key(_STR, required=True)  # over ids, captions and image bytes
    items: int = _key(_INT, required=True)
    held_out: int = _key(_INT, required=True)
    train: int | None = _key(_INT)
    validation: int | None = _key(_INT)


@dataclass(kw_only=True)
class Inputs(Record):
    text_model: InputSource = _key(_Nested(InputSource), required=True)
    image_encoder: InputSource = _key(_Nested(InputSource), required=True)
    dataset: DatasetRecord = _key(_Nested(DatasetRecord), required=True)


@dataclass(kw_only=True)
class ServedCombination(Record):
    """The non-FP32 variants served together and their combination gate on the fused output."""

    variants: dict[str, str] = _key(_OBJECT, required=True)
    gate: dict[str, Any] = _key(_OBJECT, required=True)


@dataclass(kw_only=True)
class MeasuredVariant(Record):
    """One candidate's timings in `mmrec tune` (export.tuning.variant_record)."""

    median_ms: dict[str, float] = _key(_OBJECT, required=True)  # case label -> ms
    speedup_vs_fp32: dict[str, Any] | None = _key(_OBJECT)  # mmrec.stats.Interval.to_dict()
    faster_than_fp32: str | None = _key(_STR)  # the verdict against the threshold
    ms_per_round: dict[str, list[float]] | None = _key(_OBJECT)


@dataclass(kw_only=True)
class MeasuredMember(Record):
    """One member's timings in `mmrec tune`: its candidates and the A/A arm."""

    variants: dict[str, MeasuredVariant] = _key(_DictOf(_Nested(MeasuredVariant)), required=True)
    aa: dict[str, Any] | None = _key(_OBJECT)  # mmrec.stats A/A check: stable, why, ...
    threads: int | None = _key(_INT)
    rounds: int | None = _key(_INT)
    calls_per_round: dict[str, int] | None = _key(_OBJECT)
    aa_ms_per_round: dict[str, list[float]] | None = _key(_OBJECT)


@dataclass(kw_only=True)
class TuningMachine(Record):
    cpu: str = _key(_STR, required=True)
    usable_cores: int = _key(_INT, required=True)
    flags: list[str] = _key(_LIST, required=True)
    openvino_capabilities: list[str] = _key(_LIST, required=True)


@dataclass(kw_only=True)
class TuningRecord(Record):
    """What `mmrec tune` measured on the serving machine and chose."""

    machine: TuningMachine = _key(_Nested(TuningMachine), required=True)
    versions: dict[str, str | None] = _key(_OBJECT, required=True)  # onnxruntime, openvino
    runtimes: list[str] = _key(_LIST, required=True)
    rule: str = _key(_STR, required=True)
    members: dict[str, MeasuredMember] = _key(_DictOf(_Nested(MeasuredMember)), required=True)
    chosen: dict[str, str] = _key(_OBJECT, required=True)  # member -> variant served
    fixed_by_user: dict[str, str] = _key(_OBJECT, required=True)  # --serve-variant pins, kept by a re-tune
    decisions: dict[str, str] | None = _key(_OBJECT)  # member -> why, in a line
    gates: dict[str, Any] | None = _key(_OBJECT)  # gates again on this machine, or where they ran


@dataclass(kw_only=True)
class Manifest(Record):
    """manifest.json: what was exported, from which inputs, with which numbers.

    Build one in code with the constructor (members: `MemberRecord`, `.add`, `.serve`), write
    it with `mmrec.export.manifest.write_manifest`; read one with `Manifest.load(root)`."""

    format: int = _key(_INT, required=True, default=FORMAT)
    target: str = _key(_STR, required=True)
    max_batch_size: int = _key(_INT, required=True)
    # the served contract as export wrote it: kept as the dict, because ServedContract.from_dict
    # fills keys an old manifest lacks (image_fit) and drops unknown ones; typed view: `contract`
    preprocess: dict[str, Any] = _key(_OBJECT, required=True)
    models: dict[str, MemberRecord] = _key(_DictOf(_Nested(MemberRecord)), required=True)
    training: dict[str, Any] = _key(_OBJECT, required=True)  # the fusion head's metrics (displayed)
    inputs: Inputs = _key(_Nested(Inputs), required=True)
    versions: dict[str, str | None] = _key(_OBJECT, required=True)  # python and the tracked packages
    gpu: bool | None = _key(_BOOL)  # onnxruntime target built with --gpu: encoder instances on the GPU
    build: BuildIdentity | None = _key(_Nested(BuildIdentity))
    served_combination: ServedCombination | None = _key(_Nested(ServedCombination))
    combinations: list[dict[str, Any]] | None = _key(_LIST)  # every admitted pair's combination gate
    tuning: TuningRecord | None = _key(_Nested(TuningRecord))
    admission: dict[str, Any] | None = _key(_OBJECT)  # mmrec.admission's record (export/admission.py)
    files: list[FileEntry] | None = _key(_ListOf(_Nested(FileEntry)))  # every file not a variant's

    @property
    def contract(self) -> ServedContract:
        return ServedContract.from_dict(self.preprocess)

    def _check(self, where: str) -> None:
        if self.format > FORMAT:  # a newer layout: reading (and rewriting) it could lose what it means
            raise ManifestError(f"`format` is {self.format}, newer than this mmrec reads ({FORMAT}): "
                                "upgrade mmrec to read this repository")

    def served_variants(self) -> dict[str, str]:
        """member -> the variant it serves."""
        return {name: member.served_variant for name, member in self.models.items()}

    def to_json(self) -> str:
        """The file's text: sorted keys and no timestamps, so the same inputs give the same bytes."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: Path) -> Manifest:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path} is not JSON ({err}): re-export the repository") from None
        try:
            return cls.from_dict(data)
        except ManifestError as err:
            raise ManifestError(f"{path}: {err} (written by another version of `mmrec export`? "
                                "re-export the repository)") from None

    @overload
    @classmethod
    def load(cls, root: Path, required: Literal[True] = ...) -> Manifest: ...

    @overload
    @classmethod
    def load(cls, root: Path, required: bool) -> Manifest | None: ...

    @classmethod
    def load(cls, root: Path, required: bool = True) -> Manifest | None:
        """The manifest of repository `root`; None when it has none and `required` is False
        (a hand-made repository), else FileNotFoundError naming the fix."""
        path = Path(root) / MANIFEST_FILE
        if not path.is_file():
            if required:
                raise FileNotFoundError(f"{path} not found: run `mmrec export` first")
            return None
        return cls.read(path)
