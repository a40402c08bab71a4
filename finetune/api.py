"""The Python API: a pretrained encoder together with the preprocessing it was trained on.

    from finetune import Encoder
    enc = Encoder.from_pretrained("runs/demo/stage2")        # an export, or a pretraining run directory
    image = enc.preprocess("runs/demo/cohort/ukb/1000001")  # a ukbb_cardiac NIfTI folder, or (sa.zip, la.zip)
    z = enc.embed(image)                                     # (dim,) float32: the pooled features the heads see

`preprocess` is the conversion's own code (`data_prep.sources` readers + `data_prep.preprocess_ukb.preprocess`)
with the conversion settings recorded in the encoder's training dataset, so its output is bit for bit the stored
sample (P planes, all stored frames, crop x crop, float16 in [0, 1]). `embed` takes that array (or a batch of
them), keeps the encoder's frames (`select_frames`, as the fine-tuning loader does) and returns the mean of the
encoder's output tokens: what `finetune embed` writes and what the pooled heads read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from data_prep.config import load_config
from pretrain.config import ViTConfig

Source = Union[str, Path, Sequence[Union[str, Path]]]


def is_nifti_subject(path: Path) -> bool:
    """A ukbb_cardiac NIfTI subject folder (it has the short-axis image)."""
    return (path / "sa.nii.gz").is_file() or (path / "sa.nii").is_file()


def read_study(source: Source):
    """A UK Biobank cine study from a ukbb_cardiac NIfTI folder (sa.nii.gz, la_2ch.nii.gz, ...), a folder holding
    one subject's 20209 (short axis) and 20208 (long axis) zips of instance 2, or the pair (sa_zip, la_zip)."""
    from data_prep.sources.ukb_nifti import InputError, read_ukb_dicom_study, read_ukb_nifti_dir

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
    from data_prep.preprocess_ukb import UKBPreprocessConfig, preprocess as run
    from data_prep.sources import CineStudy

    cfg = load_config(UKBPreprocessConfig, None, [f"{k}={json.dumps(v)}" for k, v in preprocess.items()])
    study = source if isinstance(source, CineStudy) else read_study(source)
    image, _, _, _, meta = run(study, cfg)
    return image, meta


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
        from pretrain.export import load_encoder, training_data

        module, vit, meta = load_encoder(path)
        data = meta.get("data")
        cfg_path = Path(meta.get("run", path)) / "config.yaml"
        if data is None and cfg_path.is_file():  # an export made before exports recorded it: the run's dataset
            from pretrain.config import PretrainConfig

            data = training_data(load_config(PretrainConfig, cfg_path).data.dataset)
        device = torch.device(device)
        return cls(module.to(device), vit, meta, data, device)

    @property
    def dim(self) -> int:
        return int(getattr(self.module, "dim", self.vit.dim))

    def preprocess(self, source: Source) -> np.ndarray:
        """One subject -> (P, T, S, S) float16: exactly the sample the conversion would store for it."""
        if not self.data or not self.data.get("preprocess"):
            raise ValueError(f"{self.meta.get('run', 'this encoder')}: no record of the conversion settings it "
                             "was trained on (the export has no data: section and the training dataset's manifest "
                             "is not readable); re-export it with `python -m pretrain export --run RUN`")
        if self.data.get("dataset") != "ukb":
            raise ValueError(f"preprocess reads UK Biobank cine studies; this encoder was trained on a "
                             f"{self.data.get('dataset')!r} dataset (convert k-space with python -m data_prep kspace)")
        return preprocess_study(source, self.data["preprocess"])[0]

    @torch.no_grad()
    def embed(self, images: np.ndarray | torch.Tensor, batch_size: int = 16) -> np.ndarray:
        """(P, T, S, S) -> (dim,), or a batch (B, P, T, S, S) -> (B, dim): the mean of the output tokens over the
        encoder's frames (evenly spaced over the stored T, as in fine-tuning), float32."""
        from finetune.models import pooled_features
        from pretrain.data import select_frames

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
        from finetune.predict import load_finetuned

        return cls(*load_finetuned(run, device))

    @property
    def task(self) -> str:
        return self.cfg.task.name

    def preprocess(self, source: Source) -> np.ndarray:
        """One raw subject as the run's training dataset was converted (see `Encoder.preprocess`)."""
        from finetune.predict import conversion_settings

        return preprocess_study(source, conversion_settings(self.cfg, self.result))[0]

    def predict(self, image: np.ndarray) -> dict:
        """One stored-format image (P, T, S, S) -> phenotypes {name: value in original units}, diseases
        {name: {"probability", "threshold", "predicted"}}, or segmentation {"labels": (P, T, S, S) uint8}: what
        `finetune predict` writes (`predict.outputs`)."""
        from finetune.predict import outputs, run_subject

        return outputs(self.cfg, self.result, run_subject(self.cfg, self.model, image))
