"""The Python API: a pretrained encoder together with the preprocessing it was trained on.

    from finetune import Encoder
    enc = Encoder.from_pretrained("runs/demo/stage2")        # an export, or a pretraining run directory
    image = enc.preprocess("runs/demo/cohort/ukb/1000001")  # a ukbb_cardiac NIfTI folder, or (sa.zip, la.zip)
    z = enc.embed(image)                                     # (dim,) float32: the pooled features the heads see

`preprocess` is the conversion's own code with the conversion settings recorded in the encoder's training
dataset, so its output is bit for bit the stored sample:
- an encoder trained on UK Biobank cine (Stage I / II): `data_prep.ukb.study` readers +
  `data_prep.ukb.preprocess.preprocess` -> (P planes, all stored frames, crop, crop) float16 in [0, 1];
- an encoder trained on k-space (MetaCLIP-CMR): one CMRxRecon / MMCMR-427K `.mat` file through
  `data_prep.kspace.preprocess.preprocess_kspace_file` (coil combination, oversampling removed, resized,
  z-scored) -> (T frames, Z slices, S, S) float16; the file's place in the published layout (`MultiCoil/Cine/...`)
  gives its metadata, so pass `relpath=` when the file was moved out of it.
`embed` takes that array (or a batch of them) and returns the pooled features: for cine the mean of the output
tokens over the encoder's frames (`select_frames`, as the fine-tuning loader does); for a k-space sequence the mean
of its single images' features over evenly spaced slices and frames (`pretrain.transforms.sequence_images`,
the evaluation transform). Both are what `finetune embed` writes and what the pooled heads read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from core.config import InputError, config_to_dict, load_config
from core.manifest import read_training_data
from finetune.models import pooled_features
from pretrain.config import KSpaceSampling, PretrainConfig, ViTConfig
from pretrain.export import load_encoder, write_export
from pretrain.models.metaclip import pool_sequences
from pretrain.transforms import select_frames, sequence_images

Source = Union[str, Path, Sequence[Union[str, Path]]]


def is_nifti_subject(path: Path) -> bool:
    """A ukbb_cardiac NIfTI subject folder (it has the short-axis image)."""
    return (path / "sa.nii.gz").is_file() or (path / "sa.nii").is_file()


def read_study(source: Source):
    """A UK Biobank cine study from a ukbb_cardiac NIfTI folder (sa.nii.gz, la_2ch.nii.gz, ...), a folder holding
    one subject's 20209 (short axis) and 20208 (long axis) zips of instance 2, or the pair (sa_zip, la_zip)."""
    from data_prep.ukb.nifti import read_ukb_dicom_study, read_ukb_nifti_dir  # lazy: data_prep (not on GPU machines)

    if isinstance(source, (list, tuple)):
        if len(source) != 2:
            raise InputError(f"{source}: give the (short-axis 20209, long-axis 20208) DICOM zips as a pair")
        return read_ukb_dicom_study(*source)
    path = Path(source)
    if not path.is_dir():
        raise InputError(f"{path}: not a folder (a ukbb_cardiac NIfTI folder or one subject's DICOM zips)")
    if is_nifti_subject(path):
        return read_ukb_nifti_dir(path)
    sa, la = sorted(path.glob("*_20209_2_0.zip")), sorted(path.glob("*_20208_2_0.zip"))
    if len(sa) == 1 and len(la) == 1:
        return read_ukb_dicom_study(sa[0], la[0])
    raise InputError(f"{path}: neither a NIfTI folder (no sa.nii.gz) nor one subject's DICOM zips "
                     f"({len(sa)} *_20209_2_0.zip and {len(la)} *_20208_2_0.zip found, one of each needed)")


def preprocess_study(source, preprocess: dict) -> tuple[np.ndarray, dict]:
    """(image (P, T, S, S) float16, meta) of one subject — a `Source` or a study `read_study` returned — under the
    conversion settings `preprocess` (a dataset manifest's `config.preprocess`): the functions the conversion job
    runs. `meta` holds the stored geometry (`planes`, `sa_slices`, `plane_affines`, spacing)."""
    from data_prep.ukb.preprocess import UKBPreprocessConfig, preprocess as run  # lazy: data_prep
    from data_prep.ukb.study import CineStudy  # lazy: data_prep

    cfg = load_config(UKBPreprocessConfig, None, [f"{k}={json.dumps(v)}" for k, v in preprocess.items()])
    study = source if isinstance(source, CineStudy) else read_study(source)
    image, _, _, _, meta = run(study, cfg)
    return image, meta


def preprocess_kspace(path: str | Path, preprocess: dict, relpath: Optional[str] = None) -> tuple[np.ndarray, dict]:
    """(images (T, Z, S, S) float16, meta) of one k-space `.mat` file under the k-space conversion settings
    `preprocess` (`size`, `keep_aspect`, `readout_oversampling` of a k-space manifest's config): the function the
    conversion job runs. `relpath`: the file's place in the dataset layout when `path` no longer shows it."""
    from data_prep.kspace.preprocess import preprocess_kspace_file  # lazy: data_prep

    missing = [k for k in ("size", "keep_aspect", "readout_oversampling") if k not in preprocess]
    if missing:
        raise ValueError(f"k-space conversion settings lack {missing} (a manifest from an older conversion): "
                         "give them explicitly")
    return preprocess_kspace_file(path, relpath, preprocess["size"], keep_aspect=preprocess["keep_aspect"],
                                  readout_oversampling=preprocess["readout_oversampling"])


@dataclass
class Encoder:
    """A pretrained image encoder (eval mode) with its architecture, provenance and preprocessing."""

    module: nn.Module
    vit: ViTConfig
    meta: dict
    data: Optional[dict] = None  # {"dataset": "ukb" | "kspace", "preprocess": conversion settings}
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "Encoder":
        """An export (`encoder.safetensors` or its folder) or a pretraining run directory (its latest complete
        checkpoint). The preprocessing comes from the export (`data:` in encoder_config.yaml, the training
        dataset's conversion settings) or, for an export made before exports recorded it, from the training
        dataset's manifest when it is still there."""
        module, vit, meta = load_encoder(path)
        data = meta.get("data")
        cfg_path = Path(meta.get("run", path)) / "config.yaml"
        if data is None and cfg_path.is_file():  # an export made before exports recorded it: the run's dataset
            data = read_training_data(load_config(PretrainConfig, cfg_path).data.dataset)
        device = torch.device(device)
        return cls(module.to(device), vit, meta, data, device)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write this encoder as an export folder (weights, `encoder_config.yaml` with its geometry, provenance and
        conversion settings, and a model card `README.md`): a HuggingFace-style model repository that
        `from_pretrained` reads back. Returns the folder."""
        keep = ("stage", "architecture", "checkpoint", "run", "provenance")
        config = {"model": config_to_dict(self.vit), "format": "cmrfm-encoder-v1",
                  **{k: self.meta[k] for k in keep if k in self.meta}, "data": self.data}
        write_export(directory, self.module.state_dict(), config)
        return Path(directory)

    @property
    def dim(self) -> int:
        return int(getattr(self.module, "dim", self.vit.dim))

    @property
    def input_kind(self) -> str:
        """"kspace" for an encoder trained on k-space sequences (MetaCLIP-CMR), else "ukb" (multi-plane cine)."""
        kind = (self.data or {}).get("dataset")
        return kind if kind in ("ukb", "kspace") else ("kspace" if self.meta.get("stage") == "metaclip" else "ukb")

    def preprocess(self, source: Source, relpath: Optional[str] = None) -> np.ndarray:
        """One subject (cine) or one k-space file -> exactly the sample the conversion would store for it:
        (P, T, S, S) or (T, Z, S, S) float16."""
        if not self.data or not self.data.get("preprocess"):
            raise ValueError(f"{self.meta.get('run', 'this encoder')}: no record of the conversion settings it "
                             "was trained on (the export has no data: section and the training dataset's manifest "
                             "is not readable); re-export it with `python -m pretrain export --run RUN`")
        if self.input_kind == "kspace":
            return preprocess_kspace(source, self.data["preprocess"], relpath)[0]
        return preprocess_study(source, self.data["preprocess"])[0]

    @torch.no_grad()
    def embed(self, images, batch_size: int = 16) -> np.ndarray:
        """One sample -> (dim,), or a batch -> (B, dim), float32. Cine: (P, T, S, S) or (B, P, T, S, S), the mean
        of the output tokens over the encoder's frames (evenly spaced over the stored T, as in fine-tuning).
        k-space: one (T, Z, S, S) sequence or a list of them (their T and Z may differ), the mean of the features
        of their evenly spaced single images."""
        if self.input_kind == "kspace":
            return self._embed_sequences(images, batch_size)
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        single = x.dim() == 4
        x = x[None] if single else x
        if x.dim() != 5:
            raise ValueError(f"images: expected (P, T, H, W) or (B, P, T, H, W), got {tuple(x.shape)}")
        frames = torch.from_numpy(select_frames(x.shape[2], self.vit.frames))
        out = [pooled_features(self.module, x[i:i + batch_size][:, :, frames].float().to(self.device)).float().cpu()
               for i in range(0, len(x), batch_size)]
        z = torch.cat(out).numpy()
        return z[0] if single else z

    def _embed_sequences(self, sequences, batch_size: int) -> np.ndarray:
        single = isinstance(sequences, (np.ndarray, torch.Tensor)) and sequences.ndim == 4
        seqs = [np.asarray(s) for s in ([sequences] if single else sequences)]
        if any(s.ndim != 4 for s in seqs):
            raise ValueError(f"k-space sequences: expected (T, Z, H, W) arrays, got shapes {[s.shape for s in seqs]}")
        out = []
        for i in range(0, len(seqs), batch_size):
            # as `finetune embed`: the sequence's images at their stored size, the evaluation choice of images
            imgs, valids = zip(*(sequence_images(s, KSpaceSampling(image_size=s.shape[-1]))
                                 for s in seqs[i:i + batch_size]))
            out.append(pool_sequences(self.module, torch.stack(imgs).to(self.device),
                                      torch.stack(valids).to(self.device)).float().cpu())
        z = torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)
        return z[0] if single else z


@dataclass
class Finetuned:
    """A finished `finetune train` run (its best weights, target statistics and thresholds) as a predictor.

        model = Finetuned.from_pretrained("runs/demo/finetune/phenotypes/vita")
        model.predict(model.preprocess("runs/demo/cohort/ukb/1000001"))   # {"LVEDV": 151.2, ...}
    """

    cfg: object
    model: nn.Module
    result: dict

    @classmethod
    def from_pretrained(cls, run: str | Path, device: str | torch.device = "cpu") -> "Finetuned":
        from finetune.predict import load_finetuned  # cycle: finetune.predict imports finetune.api

        return cls(*load_finetuned(run, device))

    @property
    def task(self) -> str:
        return self.cfg.task.name

    def preprocess(self, source: Source) -> np.ndarray:
        """One raw subject as the run's training dataset was converted (see `Encoder.preprocess`)."""
        from finetune.predict import conversion_settings  # cycle: finetune.predict imports finetune.api

        return preprocess_study(source, conversion_settings(self.cfg, self.result))[0]

    def predict(self, image: np.ndarray) -> dict:
        """One stored-format image (P, T, S, S) -> phenotypes {name: value in original units}, diseases
        {name: {"probability", "threshold", "predicted"}}, or segmentation {"labels": (P, T, S, S) uint8}: what
        `finetune predict` writes (`predict.outputs`)."""
        from finetune.predict import outputs, run_subject  # cycle: finetune.predict imports finetune.api

        return outputs(self.cfg, self.result, run_subject(self.cfg, self.model, image))
